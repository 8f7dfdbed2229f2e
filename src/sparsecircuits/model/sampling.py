"""Choosing the next token from logits (``GPT.generate``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, vocab): argmax at temperature 0 (ties to the
    lowest id), else a sample from softmax(logits / temperature) over the top_k, then over the
    smallest set of likeliest tokens whose probability reaches ``top_p`` (nucleus sampling;
    the likeliest token is always kept)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits[logits < v[:, [-1]]] = -torch.inf
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # A token stays if the mass of the likelier ones is still short of top_p.
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        drop[:, 0] = False
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)
