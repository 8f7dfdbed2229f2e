"""Small generated Python corpora for the data tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sparsecircuits.data import Tokenizer, train_tokenizer

_NAMES = ["alpha", "beta", "gamma", "delta", "value", "items", "result", "count", "index", "key"]


def python_source(seed: int) -> str:
    """A few lines of varied, valid-looking Python, different for each seed."""
    rng = random.Random(seed)
    a, b, c = rng.sample(_NAMES, 3)
    n = rng.randint(0, 999)
    return (
        f"def {a}_{seed}({b}, {c}=None):\n"
        f'    """Return {a} for {b}."""\n'
        f"    for i in range({n}):\n"
        f"        {c} = {b}[i] if {c} is None else {c} + {b}[i]\n"
        f'    print("{a}", {b}["{c}"], \'{c}\')\n'
        f"    return [{b}[{n}], {c}]\n\n"
    )


def write_py_files(root: Path, count: int, *, start: int = 0) -> list[Path]:
    """Write ``count`` generated .py files under ``root`` (some in a subdirectory)."""
    paths = []
    for i in range(start, start + count):
        path = root / ("pkg" if i % 3 == 0 else "") / f"mod_{i:03d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(python_source(i) * 3, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    """A 300-token BPE trained on generated code (fast: well under a second)."""
    return train_tokenizer([python_source(i) for i in range(200)], vocab_size=300)


@pytest.fixture(scope="session")
def make_source():
    """The :func:`python_source` generator, for tests that need document text."""
    return python_source


@pytest.fixture(scope="session")
def make_py_files():
    """The :func:`write_py_files` helper."""
    return write_py_files
