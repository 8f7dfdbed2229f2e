"""Randomised slot values for task templates, and the ``{slot}`` substitution syntax.

A template is Python text with ``{name}`` slots. A slot's *kind* is its name without trailing
digits (``{var2}`` is a second ``var``). Substitution rules (close to ``str.format``):

- ``{name}`` with ``name`` an identifier is a slot; an unknown slot is an error.
- ``{{`` and ``}}`` are a literal ``{`` and ``}`` (needed only before an identifier and ``}``,
  e.g. the f-string field ``f"{{{var}}}"``); every other brace is literal (``{1, 2}``, ``{}``).

Within one pair, identifier slots get distinct names, and slots of the same identifier kind get
names with distinct first letters: a target that is one of two random names then always starts
with a different character, so its first token differs under any tokenizer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

SLOT_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*)\}")

Generator = Literal["identifier", "int", "word", "text"]
GENERATORS: tuple[Generator, ...] = ("identifier", "int", "word", "text")

# Stdlib-flavoured pools. Names are lowercase snake_case so that they read like real code. Names
# that the stdlib BPE splits as a bare ' ' + rest (e.g. ' queue') are left out: a target token of
# just ' ' says nothing about the name.
VARS = (
    "value", "result", "items", "data", "count", "name", "path", "line", "key", "index",
    "total", "buf", "parts", "text", "node", "entry", "config", "options", "chunk",
    "size", "offset", "prefix", "state", "token", "record", "source", "target", "header",
    "field", "block", "handler", "message", "response", "request", "pending", "seen",
    "matches", "width", "height", "limit", "mode", "output", "stream", "filename", "url",
    "words", "lines", "ident", "level", "delta", "obj", "js",
)  # fmt: skip
ITEMS = (
    "item", "line", "word", "part", "token", "entry", "name", "char", "elem", "piece",
    "field", "arg", "value", "child", "record",
)  # fmt: skip
SEQS = (
    "items", "lines", "words", "parts", "tokens", "names", "chars",
    "elements", "values", "fields", "args", "children", "records", "paths",
)  # fmt: skip
FUNCS = (
    "load", "parse", "process", "handle", "compute", "update", "render",
    "normalize", "read_data", "get_value", "build", "convert", "format_line", "split_name",
    "check", "resolve", "encode", "decode", "fetch", "make_key", "expand", "scan",
    "find_all", "open_file", "write_header", "run_step", "collect",
)  # fmt: skip
METHODS = (
    "run", "close", "reset", "flush", "start", "stop", "load", "save", "get", "update",
    "parse", "render", "process", "handle", "clear", "build", "write", "read", "emit",
    "feed", "next_token", "add_item", "format", "lookup",
)  # fmt: skip
CLASSES = (
    "Parser", "Handler", "Reader", "Writer", "Config", "Cache", "Server", "Client",
    "Manager", "Builder", "Formatter", "Scanner", "Buffer", "Node", "Registry", "Loader",
    "Encoder", "Decoder", "Session", "Tracker", "Pool", "Stream", "Visitor",
)  # fmt: skip
ATTRS = (
    "name", "size", "data", "count", "items", "path", "value", "state", "buffer", "mode",
    "left", "first", "last", "head", "tail", "lower", "upper", "width", "height",
    "start", "end", "prev", "current", "parent", "child", "key",
)  # fmt: skip
WORDS = (
    "hello", "error", "done", "missing", "invalid", "value", "name", "file", "path", "line",
    "unknown", "ready", "failed", "empty", "default", "result", "found", "expected", "start",
    "stop", "open", "closed", "input", "output", "config", "option", "token", "header",
    "bad", "data", "timeout", "request", "message", "count", "level", "key",
)  # fmt: skip
EXCEPTIONS = (
    "ValueError", "KeyError", "OSError", "TypeError", "RuntimeError", "IndexError",
    "AttributeError", "LookupError", "FileNotFoundError", "ImportError",
)  # fmt: skip
FILES = ("data", "config", "notes", "output", "input", "log", "report", "setup", "index")
EXTS = ("txt", "json", "cfg", "csv", "log", "ini", "py", "dat")
MODES = ("r", "w", "rb", "wb", "a")


def _int(rng: random.Random) -> str:
    # Mostly small numbers (like real code), sometimes up to three digits (one \p{N}{1,3} chunk).
    return str(rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 999))


def _text(rng: random.Random) -> str:
    # One to three words; the last word is letters only, so a closing quote cannot merge into it.
    return " ".join(rng.sample(WORDS, rng.randint(1, 3)))


@dataclass(frozen=True)
class Slot:
    """How to fill one slot kind: a fixed pool of values or a generator function."""

    values: tuple[str, ...] = ()
    generate: Callable[[random.Random], str] | None = None
    identifier: bool = False  # distinct names per pair; distinct initials within the kind

    def draw(self, rng: random.Random, used_names: set[str], used_initials: set[str]) -> str:
        """One value; identifier slots avoid ``used_names`` and ``used_initials``."""
        if self.generate is not None:
            return self.generate(rng)
        if not self.identifier:
            return rng.choice(self.values)
        free = [v for v in self.values if v not in used_names and v[0] not in used_initials]
        # A tiny user pool cannot always satisfy the initials rule; distinct names come first.
        if not free:
            free = [v for v in self.values if v not in used_names] or list(self.values)
        value = rng.choice(free)
        used_names.add(value)
        used_initials.add(value[0])
        return value


def pool(*values: str, identifier: bool = True) -> Slot:
    """A slot drawn from ``values`` (identifiers by default)."""
    return Slot(values=tuple(values), identifier=identifier)


DEFAULT_SLOTS: dict[str, Slot] = {
    "var": pool(*VARS),
    "aux": pool(*VARS),  # a second, distractor variable
    "item": pool(*ITEMS),
    "seq": pool(*SEQS),
    "func": pool(*FUNCS),
    "method": pool(*METHODS),
    "cls": pool(*CLASSES),
    "attr": pool(*ATTRS),
    "exc": pool(*EXCEPTIONS),
    "word": pool(*WORDS, identifier=False),
    "file": pool(*FILES, identifier=False),
    "ext": pool(*EXTS, identifier=False),
    "mode": pool(*MODES, identifier=False),
    "text": Slot(generate=_text),
    "int": Slot(generate=_int),
}

GENERATOR_SLOTS: dict[Generator, Slot] = {
    "identifier": DEFAULT_SLOTS["var"],
    "int": DEFAULT_SLOTS["int"],
    "word": DEFAULT_SLOTS["word"],
    "text": DEFAULT_SLOTS["text"],
}


def slot_kind(name: str) -> str:
    """``var2`` -> ``var``: the kind a numbered slot draws from."""
    return name.rstrip("0123456789") or name


def slot_names(text: str) -> list[str]:
    """Slot names used in ``text``, in order of first use."""
    seen: dict[str, None] = {}
    for m in SLOT_RE.finditer(text):
        if m.group(1):
            seen[m.group(1)] = None
    return list(seen)


def find_slot(name: str, slots: Mapping[str, Slot]) -> Slot | None:
    """The slot for ``name``: an exact entry, else its kind in ``slots``, else a default kind."""
    for key in (name, slot_kind(name)):
        if key in slots:
            return slots[key]
    return DEFAULT_SLOTS.get(slot_kind(name))


@dataclass
class SlotSampler:
    """Draws the values of one pair; shared by the template and its surrounding context."""

    rng: random.Random
    slots: Mapping[str, Slot]
    values: dict[str, str] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set)
    _initials: dict[str, set[str]] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        """The value of slot ``name`` (drawn on first use), or None if no slot has that name."""
        if name in self.values:
            return self.values[name]
        slot = find_slot(name, self.slots)
        if slot is None:
            return None
        initials = self._initials.setdefault(slot_kind(name), set())
        self.values[name] = slot.draw(self.rng, self._names, initials)
        return self.values[name]

    def fresh(self, kind: str) -> str:
        """A new unnamed value from the *default* pool of ``kind`` (for surrounding code),
        distinct from every identifier drawn so far in this pair."""
        initials = self._initials.setdefault(f"@{kind}", set())
        return DEFAULT_SLOTS[kind].draw(self.rng, self._names, initials)

    def fill(self, text: str, on_unknown: Callable[[str], Exception]) -> str:
        """``text`` with every slot replaced; raises ``on_unknown(name)`` for an unknown slot."""

        def sub(m: re.Match[str]) -> str:
            if m.group(0) in ("{{", "}}"):
                return m.group(0)[0]
            value = self.get(m.group(1))
            if value is None:
                raise on_unknown(m.group(1))
            return value

        return SLOT_RE.sub(sub, text)


def unknown_slots(texts: Sequence[str], slots: Mapping[str, Slot]) -> list[str]:
    """Slot names in ``texts`` that neither ``slots`` nor the default kinds define."""
    return [n for t in texts for n in slot_names(t) if find_slot(n, slots) is None]
