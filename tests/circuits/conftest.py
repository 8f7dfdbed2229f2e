"""Shared fixtures for the circuit tests: a small BPE tokenizer and a tiny weight-sparse GPT
saved as a model directory that ``pipeline.load_for_circuits`` accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsecircuits.data import Tokenizer, stdlib_dir, train_tokenizer
from sparsecircuits.model import GPT, GPTConfig
from sparsecircuits.model.io import save_model
from tests.model.helpers import randomize_

_FILES = [
    "json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py",
    "bisect.py", "heapq.py", "string.py", "copy.py", "contextlib.py", "functools.py",
]  # fmt: skip
CIRCUIT_VOCAB = 512
# The tiny model of the circuit tests (vocab_size is the tokenizer's).
CIRCUIT_MODEL = dict(block_size=64, n_layer=2, d_model=32, n_head=2, d_head=8, d_mlp=64)


@torch.no_grad()
def sparsify_(model: GPT, *, frac_zero: float = 0.75, seed: int = 0) -> GPT:
    """Zero about ``frac_zero`` of every 2-D weight of the blocks and the embeddings."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 2 and name != "bigram_table":
            p.mul_((torch.rand(p.shape, generator=gen) >= frac_zero).to(p.dtype))
    return model


def circuit_model(vocab_size: int, seed: int = 0, **overrides) -> GPT:
    """A random tiny GPT with ~75% of each weight matrix zeroed, in eval mode."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**CIRCUIT_MODEL, "vocab_size": vocab_size, **overrides})
    model = randomize_(GPT(cfg), seed)
    return sparsify_(model, seed=seed).eval()


@pytest.fixture(scope="session")
def circuit_tokenizer() -> Tokenizer:
    """A 512-token BPE on a dozen stdlib modules (well under a second)."""
    texts = [(stdlib_dir() / n).read_text(encoding="utf-8") for n in _FILES]
    return train_tokenizer(texts, vocab_size=CIRCUIT_VOCAB)


@pytest.fixture(scope="session")
def circuit_model_dir(tmp_path_factory, circuit_tokenizer: Tokenizer) -> Path:
    """Directory with config.json, model.safetensors and tokenizer.json of a tiny sparse GPT."""
    directory = tmp_path_factory.mktemp("circuit_model")
    model = circuit_model(circuit_tokenizer.vocab_size)
    save_model(model, directory)
    circuit_tokenizer.save(directory)
    return directory
