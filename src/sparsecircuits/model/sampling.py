"""Choosing the next token from logits (``GPT.generate``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, vocab): argmax at temperature 0 (ties to the
    lowest id), else a sample from softmax(logits / temperature) over the top_k."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits[logits < v[:, [-1]]] = -torch.inf
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
