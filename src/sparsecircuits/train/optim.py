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
def control_grad_rms_(params: list[nn.Parameter], cfg: OptimConfig) -> float:
    """Rescale all gradients together by their global RMS; returns the RMS before scaling.

    RMS = ||g||_2 / sqrt(N) over every parameter element. "normalize" always rescales to
    ``cfg.grad_rms``; "clip" only when above it.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    n = sum(g.numel() for g in grads)
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    rms = math.sqrt(float(sq) / n)
    if cfg.grad_rms_mode == "none" or rms == 0.0:
        return rms
    if cfg.grad_rms_mode == "normalize" or rms > cfg.grad_rms:
        scale = cfg.grad_rms / rms
        for g in grads:
            g.mul_(scale)
    return rms
