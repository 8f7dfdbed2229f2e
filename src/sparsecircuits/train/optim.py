"""AdamW for the sparse GPT and global gradient-RMS control."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsecircuits import kernels
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
def grad_rms_scale(
    params: list[nn.Parameter], cfg: OptimConfig, *, sq: float | None = None
) -> tuple[float, float]:
    """(global gradient RMS, the factor the gradients are to be multiplied by).

    RMS = ||g||_2 / sqrt(N) over every parameter element. "normalize" always rescales to
    ``cfg.grad_rms``; "clip" only when above it; "none" never (factor 1). ``sq`` replaces
    the measured ||g||^2 (the fast mode's estimate of the full gradient's, see
    ``estimated_sq``).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0, 1.0
    n = sum(g.numel() for g in grads)
    if sq is None and all(g.device.type == "cpu" for g in grads):
        sq = sum(_sq(g) for g in grads)
    elif sq is None:  # one device sync for all of them
        sq = float(torch.stack([g.float().pow(2).sum() for g in grads]).sum())
    rms = math.sqrt(sq / n)
    if cfg.grad_rms_mode == "none" or rms == 0.0:
        return rms, 1.0
    if cfg.grad_rms_mode == "normalize" or rms > cfg.grad_rms:
        return rms, cfg.grad_rms / rms
    return rms, 1.0


@torch.no_grad()
def rescale_grads_(
    params: list[nn.Parameter], scale: float, *, skip: frozenset[int] = frozenset()
) -> None:
    """Multiply every gradient by ``scale`` in place, except those of the parameters whose
    id is in ``skip`` (the fast mode's support-only weights: their scaling is folded into
    the support AdamW step, which touches only their support)."""
    if scale == 1.0:
        return
    for p in params:
        if p.grad is not None and id(p) not in skip:
            p.grad.mul_(scale)


@torch.no_grad()
def control_grad_rms_(
    params: list[nn.Parameter], cfg: OptimConfig, *, sq: float | None = None
) -> float:
    """Rescale all gradients together by their global RMS (``grad_rms_scale``); returns the
    RMS before scaling."""
    rms, scale = grad_rms_scale(params, cfg, sq=sq)
    rescale_grads_(params, scale)
    return rms


def _sq(g: torch.Tensor, index: torch.Tensor | None = None) -> float:
    """||g||^2 (of the entries at flat ``index`` only, when given). A sparse gradient (a
    support step's) holds entries inside the support only: all of its values count."""
    if g.is_sparse:
        # one backward's gradient holds each entry once (AccumulateGrad marks it uncoalesced
        # anyway); more entries than the support's mean accumulated contributions: add them up
        if index is None or g._nnz() > index.numel():
            g = g.coalesce()
        return kernels.sumsq(g._values().float())
    return kernels.sumsq(g.float(), index)


@torch.no_grad()
def support_shares(
    params: dict[str, nn.Parameter],
    supports: dict[str, torch.Tensor],
    *,
    excess: dict[str, float] | None = None,
) -> dict[str, float]:
    """For each parameter with a support ({name: flat int64 indices}), the share of its
    squared gradient on the support (measured on a dense-gradient step; 1.0 when the
    gradient is zero). ``excess`` ({name: squared norm}): noise to take off a parameter's
    total first (a regrowth estimate's, see ``corrected_sq``)."""
    excess = excess or {}
    shares = {}
    for name, index in supports.items():
        g = params[name].grad
        if g is not None:
            on, total = _sq(g, index), _sq(g)
            if name in excess:  # never below the support's part
                total = max(on, total - excess[name])
            shares[name] = on / total if total > 0 else 1.0
    return shares


@torch.no_grad()
def corrected_sq(params: dict[str, nn.Parameter], excess: dict[str, float]) -> float:
    """||g||^2 with each parameter's ``excess`` ({name: squared norm}) taken off (to no less
    than 0): a regrowth step whose off-support gradients were estimated from part of the
    tokens, whose extra token noise would otherwise count as gradient."""
    sq = 0.0
    for name, p in params.items():
        if p.grad is not None:
            sq += max(0.0, _sq(p.grad) - excess.get(name, 0.0))
    return sq


@torch.no_grad()
def estimated_sq(
    params: dict[str, nn.Parameter], supports: dict[str, torch.Tensor], shares: dict[str, float]
) -> float:
    """||g||^2 of the dense gradient, estimated on a step whose weight gradients may be
    support-only: each supported parameter's on-support part ({name: flat int64 indices})
    divided by its measured share, every other parameter whole. Right whether or not a
    gradient was actually restricted (embedding gradients and dense-path layers are never)."""
    sq = 0.0
    for name, p in params.items():
        if p.grad is None:
            continue
        if name in supports:
            sq += _sq(p.grad, supports[name]) / max(shares.get(name, 1.0), 1e-12)
        else:
            sq += _sq(p.grad)
    return sq
