"""Negative controls: tasks derived from a real task whose labels the model has no reason to
follow. A faithful circuit-finding method should *fail* to find a small, low-loss circuit for
them; report their circuit size and loss next to the base task's.

Each control keeps the base task's prompts exactly (same templates, same seed -> same text) and
changes only which token counts as correct (``target_*``) and which as wrong (``other_*``):

``constant``  every prompt, A or B: correct ``token_a``, wrong ``token_b`` (default `` when`` vs
              `` is``, neither plausible after the prompts). The answer ignores the class, so a
              circuit for it is a constant bias: it measures how cheaply the method can *make up*
              an output preference, with no mechanism of the model behind it.
``arbitrary`` class A -> ``a``, class B -> ``b`` (default `` is`` / `` when``). Needs the class
              information the real circuit carries, but maps it to tokens the model never uses
              for it: a small circuit here means the method can re-route real features to
              arbitrary outputs.
``inverted``  the base task with correct and wrong swapped (A must prefer B's answer). The model
              actively does the opposite, so its accuracy starts near 0.

Token strings resolve to their *first* token under the tokenizer (like targets), and the two
must differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from sparsecircuits.tasks.base import RawPair, Split, Task, TaskError

if TYPE_CHECKING:
    from sparsecircuits.data.tokenizer import Tokenizer
    from sparsecircuits.tasks.batch import TaskBatch

ControlKind = Literal["constant", "arbitrary", "inverted"]


@dataclass(frozen=True, eq=False)
class ControlTask(Task):
    """A control derived from ``base`` (see the module docstring for ``kind``)."""

    base: Task = field(kw_only=True)
    kind: ControlKind = field(default="inverted", kw_only=True)
    token_a: str = field(default=" when", kw_only=True)
    token_b: str = field(default=" is", kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.base, Task):
            raise TaskError(f"control task {self.name} needs a base Task")
        if self.kind not in ("constant", "arbitrary", "inverted"):
            raise TaskError(f"control task {self.name}: unknown kind {self.kind!r}")
        super().__post_init__()

    @property
    def seed_key(self) -> str:
        """The base task's key, so a control sees exactly the base task's prompts."""
        return self.base.seed_key

    def raw_pairs(self, *, split: Split, n: int, seed: int) -> list[RawPair]:
        """The base task's pairs (a base subclass may generate them its own way)."""
        return self.base.raw_pairs(split=split, n=n, seed=seed)

    def relabel(self, batch: TaskBatch, tokenizer: Tokenizer) -> TaskBatch:
        """Replace the base targets as ``kind`` says."""
        if self.kind == "inverted":
            return replace(
                batch,
                target_a=batch.target_b,
                target_b=batch.target_a,
                other_a=batch.target_a,
                other_b=batch.target_b,
                tokens_a=batch.tokens_b,
                tokens_b=batch.tokens_a,
                other_tokens_a=batch.tokens_a,
                other_tokens_b=batch.tokens_b,
            )
        id_a, id_b = (self._token_id(tokenizer, s) for s in (self.token_a, self.token_b))
        if id_a == id_b:
            raise TaskError(
                f"task {self.name}: control tokens {self.token_a!r} and {self.token_b!r} resolve "
                f"to the same token {tokenizer.id_to_token(id_a)!r}"
            )
        a, b = torch.full_like(batch.target_a, id_a), torch.full_like(batch.target_a, id_b)
        text_a, text_b = tokenizer.id_to_token(id_a), tokenizer.id_to_token(id_b)
        if self.kind == "constant":
            # Both prompts: correct a, wrong b. tokens_b is then B's *correct* token, i.e. a.
            return replace(
                batch, target_a=a, target_b=a.clone(), other_a=b, other_b=b.clone(),
                tokens_a=[text_a] * batch.n, tokens_b=[text_a] * batch.n,
                other_tokens_a=[text_b] * batch.n, other_tokens_b=[text_b] * batch.n,
            )  # fmt: skip
        return replace(
            batch, target_a=a, target_b=b, other_a=b.clone(), other_b=a.clone(),
            tokens_a=[text_a] * batch.n, tokens_b=[text_b] * batch.n,
            other_tokens_a=[text_b] * batch.n, other_tokens_b=[text_a] * batch.n,
        )  # fmt: skip

    def _token_id(self, tokenizer: Tokenizer, text: str) -> int:
        ids = tokenizer.encode(text)
        if not ids:
            raise TaskError(f"task {self.name}: control token {text!r} is empty")
        return ids[0]


def _control(
    base: Task, kind: ControlKind, name: str | None, description: str, **tokens: str
) -> ControlTask:
    return ControlTask(
        name=name or f"{base.name}__{kind}",
        description=description,
        train=base.train,
        test=base.test,
        slots=base.slots,
        control=True,
        base=base,
        kind=kind,
        **tokens,
    )


def constant_target(
    base: Task, *, token_a: str = " when", token_b: str = " is", name: str | None = None
) -> ControlTask:
    """Control: every prompt of ``base`` must prefer ``token_a`` over ``token_b``."""
    desc = f"control: {base.name} prompts, always {token_a!r} over {token_b!r}"
    return _control(base, "constant", name, desc, token_a=token_a, token_b=token_b)


def arbitrary_mapping(
    base: Task, *, a: str = " is", b: str = " when", name: str | None = None
) -> ControlTask:
    """Control: class A of ``base`` must answer ``a``, class B ``b`` (each vs the other)."""
    desc = f"control: {base.name} classes mapped to {a!r} (A) and {b!r} (B)"
    return _control(base, "arbitrary", name, desc, token_a=a, token_b=b)


def inverted(base: Task, *, name: str | None = None) -> ControlTask:
    """Control: ``base`` with the correct and wrong answers swapped."""
    return _control(base, "inverted", name, f"control: {base.name} with the answers swapped")
