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
    params: list[nn.Parameter], cfg: OptimConfig, *, sq: float | None = None
) -> float:
    """Rescale all gradients together by their global RMS; returns the RMS before scaling.

    RMS = ||g||_2 / sqrt(N) over every parameter element. "normalize" always rescales to
    ``cfg.grad_rms``; "clip" only when above it. ``sq`` replaces the measured ||g||^2 (the
    fast mode's estimate of the full gradient's, see ``estimated_sq``).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    n = sum(g.numel() for g in grads)
    if sq is None:
        sq = float(torch.stack([g.float().pow(2).sum() for g in grads]).sum())
    rms = math.sqrt(sq / n)
    if cfg.grad_rms_mode == "none" or rms == 0.0:
        return rms
    if cfg.grad_rms_mode == "normalize" or rms > cfg.grad_rms:
        scale = cfg.grad_rms / rms
        for g in grads:
            g.mul_(scale)
    return rms


def _on_mask_sq(grad: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    g2 = grad.float().pow(2)
    return float(torch.where(mask, g2, 0.0).sum()), float(g2.sum())


@torch.no_grad()
def support_shares(
    params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]
) -> dict[str, float]:
    """For each masked parameter, the share of its squared gradient on its mask (measured on a
    dense-gradient step; 1.0 when the gradient is zero)."""
    shares = {}
    for name, mask in masks.items():
        g = params[name].grad
        if g is not None:
            on, total = _on_mask_sq(g, mask)
            shares[name] = on / total if total > 0 else 1.0
    return shares


@torch.no_grad()
def estimated_sq(
    params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor], shares: dict[str, float]
) -> float:
    """||g||^2 of the dense gradient, estimated on a step whose weight gradients may be
    support-only: each masked parameter's on-mask part divided by its measured share, every
    other parameter whole. Right whether or not a gradient was actually restricted (embedding
    gradients and dense-path layers are never)."""
    sq = 0.0
    for name, p in params.items():
        if p.grad is None:
            continue
        if name in masks:
            on, _ = _on_mask_sq(p.grad, masks[name])
            sq += on / max(shares.get(name, 1.0), 1e-12)
        else:
            sq += float(p.grad.float().pow(2).sum())
    return sq
