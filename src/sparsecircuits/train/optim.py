"""AdamW for the sparse GPT and global gradient-RMS control."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsecircuits.train.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (decoupled decay) with weight decay on >= 2-D parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=False,  # identical arithmetic whatever the parameter grouping (resume, DDP)
    )


@torch.no_grad()
def control_grad_rms_(
    params: list[nn.Parameter], cfg: OptimConfig, *, mass_ratio: float = 1.0
) -> float:
    """Rescale all gradients together by their global RMS; returns the RMS before scaling.

    RMS = ||g||_2 / sqrt(N) over every parameter element. "normalize" always rescales to
    ``cfg.grad_rms``; "clip" only when above it. ``mass_ratio`` < 1 says the gradients hold
    only that share of the full squared gradient (support-only weight gradients, see
    ``support_mass_ratio``): the full RMS is estimated as if the rest were there.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    n = sum(g.numel() for g in grads)
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    rms = math.sqrt(float(sq) / max(mass_ratio, 1e-12) / n)
    if cfg.grad_rms_mode == "none" or rms == 0.0:
        return rms
    if cfg.grad_rms_mode == "normalize" or rms > cfg.grad_rms:
        scale = cfg.grad_rms / rms
        for g in grads:
            g.mul_(scale)
    return rms


@torch.no_grad()
def support_mass_ratio(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> float:
    """Share of the squared gradient that lies on the given supports (parameters without a
    mask count whole): what a support-only gradient keeps of a dense one. 1.0 when empty."""
    total = kept = 0.0
    for name, p in params.items():
        if p.grad is None:
            continue
        g2 = p.grad.float().pow(2)
        s = float(g2.sum())
        total += s
        kept += float(g2[masks[name]].sum()) if name in masks else s
    return kept / total if total > 0 else 1.0
