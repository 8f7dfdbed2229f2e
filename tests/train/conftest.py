"""Shared fixtures: a small real-Python corpus and a tiny training config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sparsecircuits.data import stdlib_dir
from sparsecircuits.train.config import TrainConfig

# A fixed handful of stdlib modules: real Python, ~150 KB, present on every interpreter.
_FILES = [
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/scanner.py",
    "textwrap.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "bisect.py",
    "heapq.py",
    "colorsys.py",
    "keyword.py",
    "string.py",
    "stat.py",
    "copy.py",
    "numbers.py",
]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for rel in _FILES:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stdlib_dir() / rel, dest)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config(corpus: Path, **overrides) -> TrainConfig:
    data = dict(
        model=dict(n_layer=2, d_model=32, n_head=2, d_head=16, block_size=32),
        sparsity=dict(target_l0=1 / 8, anneal_end=0.5),
        optim=dict(lr=1e-2),
        corpus=str(corpus),
        val_fraction=0.2,
        tokenizer_vocab=320,
        batch_size=4,
        steps=24,
        eval_every=8,
        eval_windows=4,
        log_every=1,
        checkpoint_every=8,
    )
    data.update(overrides)
    return TrainConfig.from_dict(data)
