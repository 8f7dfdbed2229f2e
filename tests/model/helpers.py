"""Tiny models with every parameter and buffer randomised, shared by the model tests."""

from __future__ import annotations

from typing import Any

import torch

from sparsecircuits.model import GPT, GPTConfig

# Small enough that the whole tests/model run stays fast; d_attn = 32 != d_model and d_mlp != 4 *
# d_model so that shape mix-ups between the three widths cannot go unnoticed.
TINY: dict[str, Any] = dict(
    block_size=24, vocab_size=80, n_layer=2, n_head=4, d_head=8, d_model=48, d_mlp=96
)


def tiny_config(**overrides: Any) -> GPTConfig:
    return GPTConfig(**{**TINY, **overrides})


@torch.no_grad()
def randomize_(model: GPT, seed: int) -> GPT:
    """Give every parameter and buffer random values.

    The GPT-2 init zeroes biases, sink logits and the bigram table, which would let bugs in
    those paths pass unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        noise = torch.randn(t.shape, generator=gen)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t.copy_(1.0 + 0.1 * noise)
        elif t.dim() == 2 and name != "bigram_table":
            t.copy_(noise / t.shape[-1] ** 0.5)  # unit-scale activations
        else:  # biases, norm biases, sink logits, bigram table, final_logits_bias
            t.copy_(0.3 * noise)
    return model


def tiny_model(seed: int = 0, **overrides: Any) -> GPT:
    """A randomised tiny model in eval mode (``overrides`` are GPTConfig fields)."""
    torch.manual_seed(seed)
    return randomize_(GPT(tiny_config(**overrides)), seed).eval()


def tokens(batch: int = 2, seq: int = 12, *, vocab: int = TINY["vocab_size"], seed: int = 0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
