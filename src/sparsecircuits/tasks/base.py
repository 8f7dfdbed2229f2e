"""Tasks: paired prompts generated from templates, seeded and split into disjoint templates.

A :class:`Task` holds train and test :class:`Template` lists. Each template gives the text of
prompt A and prompt B (with ``{slot}`` fields, see :mod:`~sparsecircuits.tasks.slots`) and the
text each one's correct answer starts with. :meth:`Task.raw_pairs` fills the slots, wraps the
snippet in random surrounding code (module level, a function body or a method body, indented to
match) and returns :class:`RawPair` strings; :meth:`Task.build` resolves them under a tokenizer
into a :class:`~sparsecircuits.tasks.batch.TaskBatch`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sparsecircuits.errors import SparseCircuitsError
from sparsecircuits.tasks.slots import DEFAULT_SLOTS, Slot, SlotSampler, unknown_slots

if TYPE_CHECKING:
    from sparsecircuits.data.tokenizer import Tokenizer
    from sparsecircuits.tasks.batch import TaskBatch

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
Context = Literal["module", "function", "method"]
CONTEXTS: tuple[Context, ...] = ("module", "function", "method")


class TaskError(SparseCircuitsError):
    """A task cannot be defined, generated or expressed under a tokenizer."""


@dataclass(frozen=True)
class Template:
    """One paired snippet. ``a``/``b`` are the prompts (ending where the answer starts),
    ``a_target``/``b_target`` the text the correct answer starts with (e.g. ``'")\\n'``).

    ``a_suffix``/``b_suffix`` close whatever the prompt + target leave open (a block body), so
    that the completed text can be checked with ``ast.parse``; set ``check_syntax=False`` only for
    a construct that cannot be completed. ``contexts`` lists where the snippet may be placed:
    ``"module"`` (top level, after random imports), ``"function"`` (a function body, indented 4)
    or ``"method"`` (a method body, indented 8).
    """

    a: str
    a_target: str
    b: str
    b_target: str
    a_suffix: str = ""
    b_suffix: str = ""
    contexts: tuple[Context, ...] = CONTEXTS
    check_syntax: bool = True

    def texts(self) -> tuple[str, ...]:
        """Every text field (for slot checks and the train/test disjointness check)."""
        return (self.a, self.a_target, self.b, self.b_target, self.a_suffix, self.b_suffix)


@dataclass(frozen=True)
class RawPair:
    """Prompt and correct continuation of each side, as plain text. ``suffix_*`` completes the
    statement for the syntax check; ``template`` is the index in the split's template list."""

    prompt_a: str
    continuation_a: str
    prompt_b: str
    continuation_b: str
    suffix_a: str = ""
    suffix_b: str = ""
    check_syntax: bool = True
    template: int = -1
    context: str = ""


_PREAMBLES = (
    "",
    "import os\n\n",
    "import sys\n\n",
    "import os\nimport sys\n\n",
    "from pathlib import Path\n\n",
    "import logging\n\nlogger = logging.getLogger(__name__)\n\n",
)
# Optional first statements of a function body; `{arg}` is the function's parameter.
_FILLERS = (
    "",
    "",
    "{arg} = {arg} or {int}\n",
    "if {arg} is None:\n    return None\n",
    "{arg} = list({arg})\n",
)


def indent_at(text: str, cut: int, prefix: str) -> tuple[str, int]:
    """Indent every non-blank line of ``text`` by ``prefix``; returns the text and where ``cut``
    moved to. A line that starts exactly at ``cut`` keeps its new indentation after the cut, so a
    prompt ending in a newline leaves the next line's whole indentation to the continuation."""
    out, pos, new_cut = [], 0, cut
    for line in text.splitlines(keepends=True):
        if line.strip():
            out.append(prefix + line)
            if pos < cut:
                new_cut += len(prefix)
        else:
            out.append(line)
        pos += len(line)
    return "".join(out), new_cut


@dataclass(frozen=True, eq=False)
class Task:
    """A named two-choice next-token task built from train and test templates.

    ``slots`` overrides or adds slot kinds (e.g. ``{"var": pool("current")}``). Subclasses may
    override :meth:`raw_pairs` to generate text any other way; :meth:`build` does the rest.
    """

    name: str
    description: str
    train: tuple[Template, ...] = ()
    test: tuple[Template, ...] = ()
    slots: Mapping[str, Slot] = field(default_factory=dict)
    control: bool = False  # a negative control, not a behaviour of the model

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise TaskError(f"task name {self.name!r} must be letters, digits and underscores")
        for split in SPLITS:
            templates = self.templates(split)
            if not templates:
                raise TaskError(f"task {self.name}: no {split} templates")
            for t in templates:
                bad = [c for c in t.contexts if c not in CONTEXTS]
                if bad or not t.contexts:
                    raise TaskError(
                        f"task {self.name}: template {t.a!r} has contexts {t.contexts!r}, "
                        f"expected a non-empty subset of {CONTEXTS}"
                    )
                if not t.a_target or not t.b_target:
                    raise TaskError(f"task {self.name}: template {t.a!r} has an empty target")
                unknown = unknown_slots(t.texts(), self.slots)
                if unknown:
                    raise TaskError(
                        f"task {self.name}: template {t.a!r} uses unknown slot {{{unknown[0]}}}"
                    )
        shared = {s for t in self.train for s in (t.a, t.b)} & {
            s for t in self.test for s in (t.a, t.b)
        }
        if shared:
            raise TaskError(
                f"task {self.name}: prompt template {sorted(shared)[0]!r} is in both train and "
                "test (splits must use disjoint templates)"
            )

    @property
    def seed_key(self) -> str:
        """Name the random stream is keyed on (controls reuse their base task's prompts)."""
        return self.name

    def templates(self, split: Split) -> tuple[Template, ...]:
        """The templates of ``split``."""
        if split not in SPLITS:
            raise TaskError(f"task {self.name}: split must be one of {SPLITS}, got {split!r}")
        return self.train if split == "train" else self.test

    def raw_pairs(self, *, split: Split, n: int, seed: int) -> list[RawPair]:
        """``n`` random pairs from the ``split`` templates; the same seed gives the same text."""
        templates = self.templates(split)
        # A string seed is hashed deterministically (not by PYTHONHASHSEED), per task and split.
        rng = random.Random(f"{self.seed_key}/{split}/{seed}")
        return [self._one_pair(rng, templates) for _ in range(n)]

    def build(
        self,
        tokenizer: Tokenizer,
        *,
        split: Split = "train",
        n: int = 64,
        seed: int = 0,
        max_len: int = 256,
    ) -> TaskBatch:
        """``n`` pairs resolved under ``tokenizer``; prompts left-truncated to ``max_len - 1``
        tokens (the model's context minus the answer). Raises TaskError if a pair is not valid
        Python or its targets cannot be expressed as two distinct first tokens."""
        from sparsecircuits.tasks.batch import resolve_batch

        if n < 1:
            raise TaskError(f"task {self.name}: n must be >= 1, got {n}")
        if max_len < 2:
            raise TaskError(f"task {self.name}: max_len must be >= 2, got {max_len}")
        pairs = self.raw_pairs(split=split, n=n, seed=seed)
        batch = resolve_batch(self, tokenizer, pairs, split=split, max_len=max_len)
        return self.relabel(batch, tokenizer)

    def relabel(self, batch: TaskBatch, tokenizer: Tokenizer) -> TaskBatch:
        """Hook for controls: change which token counts as correct. Real tasks keep the batch."""
        del tokenizer  # used by controls to resolve their token strings
        return batch

    # ------------------------------------------------------------------------------ helpers
    def _error(self, name: str) -> TaskError:
        return TaskError(f"task {self.name}: unknown slot {{{name}}}")

    def _one_pair(self, rng: random.Random, templates: Sequence[Template]) -> RawPair:
        index = rng.randrange(len(templates))
        t = templates[index]
        context = rng.choice(t.contexts)
        sampler = SlotSampler(rng=rng, slots=self.slots)
        # Template slots first, so the names a target depends on get the widest choice.
        fill = sampler.fill
        a, a_target, a_suffix = (fill(s, self._error) for s in (t.a, t.a_target, t.a_suffix))
        b, b_target, b_suffix = (fill(s, self._error) for s in (t.b, t.b_target, t.b_suffix))
        head, indent = self._context(rng, sampler, context)
        sides = []
        for prompt, target, suffix in ((a, a_target, a_suffix), (b, b_target, b_suffix)):
            full, cut = indent_at(prompt + target + suffix, len(prompt), indent)
            _, end = indent_at(prompt + target + suffix, len(prompt) + len(target), indent)
            sides.append((head + full[:cut], full[cut:end], full[end:]))
        (pa, ca, sa), (pb, cb, sb) = sides
        return RawPair(pa, ca, pb, cb, sa, sb, t.check_syntax, index, context)

    @staticmethod
    def _context(rng: random.Random, sampler: SlotSampler, context: Context) -> tuple[str, str]:
        """Surrounding code before the snippet, and the snippet's indentation."""
        head = rng.choice(_PREAMBLES)
        if context == "module":
            return head, ""
        # PEP 8: two blank lines between imports and a top-level def or class.
        head += "\n" if head else ""
        # Context names come from the default pools, distinct from the template's names.
        arg = sampler.fresh("var")
        filler = rng.choice(_FILLERS).format(arg=arg, int=rng.randint(0, 9))
        doc = f'"""{sampler.fresh("text").capitalize()}."""\n' if rng.random() < 0.3 else ""
        if context == "function":
            head += f"def {sampler.fresh('func')}({arg}):\n"
            return head + indent_at(doc + filler, 0, "    ")[0], "    "
        head += f"class {sampler.fresh('cls')}:\n    def {sampler.fresh('method')}(self, {arg}):\n"
        return head + indent_at(doc + filler, 0, "        ")[0], "        "


__all__ = [
    "CONTEXTS",
    "DEFAULT_SLOTS",
    "SPLITS",
    "Context",
    "RawPair",
    "Split",
    "Task",
    "TaskError",
    "Template",
]
