"""Resolving raw text pairs under a tokenizer into token prompts and target token ids.

Rules, applied to each side of a pair:

1. ``prompt + continuation (+ suffix)`` must ``ast.parse`` (unless the template opts out).
2. No merge across the boundary: ``encode(prompt)`` must equal the first ``len(encode(prompt))``
   tokens of ``encode(prompt + continuation)``; otherwise the model would see a prompt whose last
   token never precedes the answer in real text.
3. The target is the *first* token of the continuation in that full-string encoding.
4. Shared first tokens: while both sides' targets are the same token, its text moves into both
   prompts and the continuations go on with the remainder (e.g. ``]]\\n`` vs ``]\\n`` under a
   tokenizer that splits both as ``]`` + ...). The two final targets must differ.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from sparsecircuits.tasks.base import RawPair, Split, TaskError

if TYPE_CHECKING:
    from sparsecircuits.data.tokenizer import Tokenizer
    from sparsecircuits.tasks.base import Task

# A continuation this many shared tokens deep is not a minimal contrast any more.
MAX_SHARED_TOKENS = 8


@dataclass(frozen=True)
class TaskBatch:
    """``n`` resolved pairs of one task and split.

    Prompt A's answer is ``target_a`` (scored against ``other_a``); prompt B's is ``target_b``
    (against ``other_b``). For real tasks ``other_a == target_b`` and ``other_b == target_a``;
    controls relabel them. Token tensors are int64 of shape (n,).
    """

    task: str
    split: Split
    prompts_a: list[list[int]]  # token ids, left-truncated to max_len - 1
    prompts_b: list[list[int]]
    target_a: torch.Tensor
    target_b: torch.Tensor
    other_a: torch.Tensor
    other_b: torch.Tensor
    tokens_a: list[str]  # readable text of target_a, e.g. '")\n'
    tokens_b: list[str]
    other_tokens_a: list[str]  # readable text of other_a
    other_tokens_b: list[str]
    moved: list[str]  # text moved from both continuations into both prompts ("" if none)
    raw: list[RawPair]  # the resolved text: prompts include the moved text

    @property
    def n(self) -> int:
        """Number of pairs (the batch holds 2n prompts)."""
        return len(self.prompts_a)

    def head(self, n: int) -> TaskBatch:
        """The first ``n`` pairs (all of them if there are fewer)."""
        fields = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            fields[name] = value[:n] if isinstance(value, list | torch.Tensor) else value
        return replace(self, **fields)

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt in tokens."""
        return max(len(p) for p in self.prompts_a + self.prompts_b)

    def contrasts(self) -> list[tuple[str, str, int]]:
        """``(token_a, token_b, count)`` of the distinct contrasts, most common first."""
        counts = Counter(zip(self.tokens_a, self.tokens_b, strict=True))
        return [(a, b, c) for (a, b), c in counts.most_common()]

    def describe(self) -> list[str]:
        """One line per distinct contrast, most common first, e.g.
        ``A '")\\n' over "')\\n", B "')\\n" over '")\\n'  (37 pairs)`` (for ``tasks show``)."""
        rows = zip(
            self.tokens_a, self.other_tokens_a, self.tokens_b, self.other_tokens_b, strict=True
        )
        return [
            f"A {a!r} over {oa!r}, B {b!r} over {ob!r}  ({count} pairs)"
            for (a, oa, b, ob), count in Counter(rows).most_common()
        ]

    def moved_counts(self) -> list[tuple[str, int]]:
        """``(moved text, count)`` of pairs whose shared first tokens moved into the prompts."""
        return Counter(m for m in self.moved if m).most_common()


def _syntax_check(task: Task, side: str, text: str) -> None:
    try:
        ast.parse(text)
    except SyntaxError as err:
        raise TaskError(
            f"task {task.name}: completed prompt {side} {text!r} is not valid Python "
            f"({err.msg}, line {err.lineno})"
        ) from None


def _first_token(task: Task, tokenizer: Tokenizer, prompt: str, continuation: str) -> list[int]:
    """Prompt ids + the continuation's first token id; raises TaskError on a boundary merge."""
    ids = tokenizer.encode(prompt)
    full = tokenizer.encode(prompt + continuation)
    if full[: len(ids)] != ids:
        raise TaskError(
            f"task {task.name}: the answer {continuation!r} merges with the end of the prompt "
            f"{prompt[-40:]!r} under this tokenizer (the prompt's tokens change)"
        )
    if len(full) == len(ids):
        raise TaskError(f"task {task.name}: empty continuation after prompt {prompt[-40:]!r}")
    return [*ids, full[len(ids)]]


def resolve_pair(
    task: Task, tokenizer: Tokenizer, pair: RawPair
) -> tuple[list[int], list[int], str, RawPair]:
    """Token ids of prompt A + its target and prompt B + its target, the text moved into both
    prompts, and the pair with that text moved. Raises TaskError if the pair cannot be used."""
    if pair.check_syntax:
        _syntax_check(task, "A", pair.prompt_a + pair.continuation_a + pair.suffix_a)
        _syntax_check(task, "B", pair.prompt_b + pair.continuation_b + pair.suffix_b)
    moved, original = "", pair
    for _ in range(MAX_SHARED_TOKENS):
        ids_a = _first_token(task, tokenizer, pair.prompt_a, pair.continuation_a)
        ids_b = _first_token(task, tokenizer, pair.prompt_b, pair.continuation_b)
        if ids_a[-1] != ids_b[-1]:
            return ids_a, ids_b, moved, pair
        shared = tokenizer.decode([ids_a[-1]])
        ca, cb = pair.continuation_a, pair.continuation_b
        if not (ca.startswith(shared) and cb.startswith(shared)) or shared in (ca, cb):
            # The shared token is a whole continuation (or not a clean prefix of both), so no
            # token after it can tell the two sides apart.
            raise TaskError(
                f"task {task.name}: targets {original.continuation_a!r} and "
                f"{original.continuation_b!r} both resolve to {moved + shared!r} and nothing "
                "after it differs"
            )
        moved += shared
        pair = replace(
            pair,
            prompt_a=pair.prompt_a + shared,
            continuation_a=ca[len(shared) :],
            prompt_b=pair.prompt_b + shared,
            continuation_b=cb[len(shared) :],
        )
    raise TaskError(
        f"task {task.name}: targets {original.continuation_a!r} and {original.continuation_b!r} "
        f"share more than {MAX_SHARED_TOKENS} first tokens ({moved!r})"
    )


def resolve_batch(
    task: Task, tokenizer: Tokenizer, pairs: Sequence[RawPair], *, split: Split, max_len: int
) -> TaskBatch:
    """Resolve every pair of ``pairs`` (see the module docstring) into a :class:`TaskBatch`."""
    prompts_a, prompts_b, t_a, t_b, moved, raw = [], [], [], [], [], []
    keep = max_len - 1
    for pair in pairs:
        ids_a, ids_b, shared, resolved = resolve_pair(task, tokenizer, pair)
        prompts_a.append(ids_a[:-1][-keep:])
        prompts_b.append(ids_b[:-1][-keep:])
        t_a.append(ids_a[-1])
        t_b.append(ids_b[-1])
        moved.append(shared)
        raw.append(resolved)
    target_a = torch.tensor(t_a, dtype=torch.long)
    target_b = torch.tensor(t_b, dtype=torch.long)
    return TaskBatch(
        task=task.name,
        split=split,
        prompts_a=prompts_a,
        prompts_b=prompts_b,
        target_a=target_a,
        target_b=target_b,
        other_a=target_b.clone(),
        other_b=target_a.clone(),
        tokens_a=[tokenizer.id_to_token(i) for i in t_a],
        tokens_b=[tokenizer.id_to_token(i) for i in t_b],
        other_tokens_a=[tokenizer.id_to_token(i) for i in t_b],
        other_tokens_b=[tokenizer.id_to_token(i) for i in t_a],
        moved=moved,
        raw=raw,
    )
