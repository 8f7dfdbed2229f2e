"""Schedules: the annealed L0 fraction and the (sharkfin) learning-rate factor."""

from __future__ import annotations

import math

from sparsecircuits.train.config import OptimConfig, SparsityConfig


def l0_fraction(step: int, total: int, cfg: SparsityConfig) -> float:
    """Nonzero fraction after optimizer step ``step`` (0-based) of ``total``.

    1.0 until ``anneal_start``; then linear (or exponential, target**progress) to
    ``target_l0`` at ``anneal_end``; constant afterwards.
    """
    if cfg.target_l0 >= 1.0:
        return 1.0
    t = (step + 1) / total
    if t <= cfg.anneal_start:
        return 1.0
    width = cfg.anneal_end - cfg.anneal_start
    p = 1.0 if width <= 0 else min(1.0, (t - cfg.anneal_start) / width)
    if p >= 1.0:
        return cfg.target_l0  # exactly, so final budgets are reproducible
    if cfg.anneal == "exponential":
        return cfg.target_l0**p
    return 1.0 - (1.0 - cfg.target_l0) * p


def warmup_decay(step: int, total: int, warmup_frac: float) -> float:
    """Learning-rate factor of step ``step`` (0-based) of ``total``: linear warmup over
    ``warmup_frac`` of the steps (at least one), then linear decay to 0. Shared by training and
    mask training (circuit pruning)."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def lr_at(step: int, total: int, optim: OptimConfig, frac: float) -> float:
    """Learning rate for step ``step``: :func:`warmup_decay`, times the sharkfin factor
    1/sqrt(frac) where ``frac`` is the current L0 fraction."""
    factor = warmup_decay(step, total, optim.warmup_frac)
    if optim.sharkfin:
        factor /= math.sqrt(frac)
    return optim.lr * factor


def regrows(step: int, total: int, cfg: SparsityConfig) -> bool:
    """In the fast weight-gradient mode, whether ``step`` takes dense weight gradients and a
    projection (weights may regrow): every ``regrow_every`` steps and whenever the L0 budget
    changes (the anneal). A pure function of the step, so a resumed run decides alike."""
    if step == 0 or step % cfg.regrow_every == 0:
        return True
    return l0_fraction(step, total, cfg) != l0_fraction(step - 1, total, cfg)
