"""Tokenizers for the task tests (each trained in about a second or less)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsecircuits.data import Tokenizer, stdlib_dir, train_tokenizer
from sparsecircuits.model.io import PRETRAINED_ROOT

# The shipped stdlib model's tokenizer: used once it is shipped, else an equivalent is trained.
REAL_TOKENIZER = PRETRAINED_ROOT / "stdlib-sparse" / "tokenizer.json"
_SMALL_FILES = [
    "json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py",
    "bisect.py", "heapq.py", "string.py", "copy.py", "contextlib.py", "functools.py",
]  # fmt: skip


def _stdlib_texts(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in paths]


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    """A 600-token BPE on a dozen stdlib modules: few merges, so targets split differently."""
    return train_tokenizer(_stdlib_texts([stdlib_dir() / n for n in _SMALL_FILES]), vocab_size=600)


@pytest.fixture(scope="session")
def stdlib_tokenizer() -> Tokenizer:
    """A 2048-token BPE on 60 top-level stdlib modules (like the real one, ~1 s to train)."""
    files = sorted(p for p in stdlib_dir().glob("*.py") if not p.name.startswith("_"))[:60]
    return train_tokenizer(_stdlib_texts(files), vocab_size=2048)


@pytest.fixture(scope="session")
def run_tokenizer(stdlib_tokenizer: Tokenizer) -> Tokenizer:
    """The shipped model's tokenizer if installed, else the trained 2048-token one."""
    return Tokenizer.load(REAL_TOKENIZER) if REAL_TOKENIZER.is_file() else stdlib_tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with a single merge: every target is its first byte."""
    return train_tokenizer(["aaaa bbbb"], vocab_size=258)
