"""A tiny random GPT for the task tests."""

from __future__ import annotations

import torch

from sparsecircuits.model import GPT, GPTConfig


def tiny_model(vocab_size: int, *, seed: int = 0, block_size: int = 96) -> GPT:
    """A 2-layer GPT with every parameter and buffer random (init zeros would hide bugs)."""
    torch.manual_seed(seed)
    config = GPTConfig(
        block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, d_head=8, d_model=32
    )
    model = GPT(config)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.copy_(torch.randn_like(t) * 0.3)
    return model.eval()
