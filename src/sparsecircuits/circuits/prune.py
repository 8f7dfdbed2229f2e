"""Circuit discovery by node pruning (Gao et al. 2025, Appendix A.5).

1. One real parameter tau per node, N(init_noise_bias, init_noise_scale) so every node starts on.
   Forward: hard gate H(tau); backward: sigmoid-derivative surrogate at temperature T.
2. Minimise ``task loss + k_coef * sum H(tau)`` with AdamW on tau only (model frozen), gradient
   RMS clipped to 1, linear warmup/decay, tau clamped to [-1, 1] after each step. Pruned nodes are
   ablated (pretraining mean by default).
3. Rank nodes by tau and bisect on k for the fewest top-k nodes whose task loss <= target,
   optionally after a 2-parameter logit calibration (16 LBFGS steps).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from sparsecircuits.circuits.masking import (
    Ablation,
    frozen_norms,
    heaviside,
    masked_last_logits,
    norm_scales,
)
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.prompts import Chunk, PromptSet
from sparsecircuits.model.config import StrictModel
from sparsecircuits.model.gpt import GPT
from sparsecircuits.tasks.metrics import Calibration, calibrated, diff_loss, fit_calibration
from sparsecircuits.train.schedule import warmup_decay

log = logging.getLogger(__name__)

AblationKind = Literal["mean", "zero", "task_mean"]


class PruneConfig(StrictModel):
    """Pruning hyperparameters; defaults are the paper's Table-2 search centres except where a
    comment says otherwise (measured on stdlib-sparse to fit a 60 s CPU budget)."""

    target_loss: float = Field(0.15, gt=0)  # nats per prompt (the paper's 0.15)
    k_coef: float = Field(3e-3, ge=0)  # per active node (paper 1e-4 on ~100x larger models)
    # Ramp the penalty up linearly over this fraction of the steps. Adam moves every tau by
    # about lr per step, so with the full penalty from step 0 all unimportant nodes cross zero
    # together and a strong penalty can collapse the circuit before importance shows.
    penalty_warmup_frac: float = Field(0.0, ge=0, le=1)
    lr: float = Field(1e-2, gt=0)  # paper 3e-3 over far more steps; 1e-2 fits 200 steps
    weight_decay: float = Field(1e-3, ge=0)
    beta2: float = Field(0.95, gt=0, lt=1)
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    heaviside_temp: float = Field(1.0, gt=0)
    init_noise_bias: float = 0.1
    init_noise_scale: float = Field(0.01, ge=0)
    steps: int = Field(80, ge=1)
    n_train_pairs: int = Field(64, ge=1)  # the fixed training set
    batch_pairs: int = Field(16, ge=1)  # pairs per optimiser step (paper 64; 16 fits 60 s)
    n_test_pairs: int = Field(64, ge=1)  # held-out templates for circuit_test
    ablation: AblationKind = "mean"
    mask_embed: bool = False  # also one node per vocabulary entry of the token embedding
    calibrate: bool = False  # fit logit scale + shift before judging each k
    frozen_norms: bool = False  # norm factors from the unpruned pass (Drori's control)
    max_bisect_iters: int = Field(50, ge=1)
    seed: int = 0


@dataclass
class PruneResult:
    """What pruning found. ``order``: flat node indices by decreasing tau; the circuit is
    ``order[:k]``. Losses are per-prompt means in nats."""

    config: PruneConfig
    space: NodeSpace
    tau: torch.Tensor  # (total,)
    order: torch.Tensor  # (total,) int64
    k: int
    reached: bool  # the circuit's train loss <= target
    loss_full: float
    loss_circuit: float
    calibration: Calibration | None
    curve: list[dict[str, float]] = field(default_factory=list)  # per step
    k_curve: list[tuple[int, float]] = field(default_factory=list)  # (k, loss), sorted by k
    seconds: float = 0.0
    edges: Any = None  # the EdgeSet, once described (pipeline.describe)

    @property
    def kept(self) -> torch.Tensor:
        """Flat indices of the circuit's nodes, ascending."""
        return self.order[: self.k].sort().values


def gates_for(space: NodeSpace, kept: torch.Tensor) -> torch.Tensor:
    """0/1 gates (total,) with ones at the flat indices ``kept``."""
    g = torch.zeros(space.total)
    g[kept] = 1.0
    return g


class CircuitEvaluator:
    """Task loss of ``model`` with a node set kept and every other node of ``space`` ablated.

    ``frozen_norms``: every norm divides by its factor from the unmasked pass on the same
    prompts (computed once per prompt chunk), Drori's control against pruning that works by
    rescaling the residual stream.
    """

    def __init__(
        self, model: GPT, *, space: NodeSpace, ablation: Ablation, frozen_norms: bool = False
    ) -> None:
        ablation.check(space)
        dev = next(model.parameters()).device
        self.model, self.space, self.ablation = model, space, ablation.to(dev)
        self.frozen_norms = frozen_norms
        self._scales: dict[int, tuple[Chunk, dict[str, torch.Tensor]]] = {}

    def chunk_logits(self, c: Chunk, gates: torch.Tensor, *, skip_full: bool) -> torch.Tensor:
        """Final-position logits (n, vocab) of one chunk under ``gates`` (total,)."""

        def run() -> torch.Tensor:
            return masked_last_logits(
                self.model,
                c.idx,
                c.lengths,
                space=self.space,
                gates=gates,
                ablation=self.ablation,
                skip_full=skip_full,
            )

        if not self.frozen_norms:
            return run()
        if id(c) not in self._scales:  # keep the chunk alive so its id stays unique
            self._scales[id(c)] = (c, norm_scales(self.model, c.idx, c.lengths))
        with frozen_norms(self.model, self._scales[id(c)][1]):
            return run()

    def logits_fn(self, gates: torch.Tensor, *, skip_full: bool) -> Callable[[Chunk], torch.Tensor]:
        return lambda c: self.chunk_logits(c, gates, skip_full=skip_full)

    @torch.no_grad()
    def diffs(self, prompts: PromptSet, gates: torch.Tensor) -> torch.Tensor:
        """Correct-minus-other logit differences (n_prompts,) under hard ``gates``."""
        dev = next(self.model.parameters()).device
        return prompts.logit_diffs(self.logits_fn(gates.to(dev), skip_full=True)).cpu()

    def loss(
        self, prompts: PromptSet, gates: torch.Tensor, *, calibration: bool = False
    ) -> tuple[float, Calibration | None]:
        """(mean per-prompt loss, calibration or None) under hard gates; with ``calibration``
        the logits are first calibrated (positive scale) on these prompts."""
        d = self.diffs(prompts, gates)
        if not calibration:
            return diff_loss(d), None
        cal = fit_calibration(d, prompts.signs.cpu())
        return diff_loss(calibrated(d, prompts.signs.cpu(), cal)), cal


def train_masks(
    evaluator: CircuitEvaluator,
    train: PromptSet,
    cfg: PruneConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Optimise tau for ``cfg.steps`` steps, one chunk of ``train`` per step (chunks in turn).
    Returns (tau (total,) on the CPU, per-step curve)."""
    space = evaluator.space
    gen = torch.Generator().manual_seed(cfg.seed)
    tau0 = cfg.init_noise_bias + cfg.init_noise_scale * torch.randn(space.total, generator=gen)
    dev = next(evaluator.model.parameters()).device
    tau = tau0.to(dev).requires_grad_(True)
    opt = torch.optim.AdamW(
        [tau], lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay, foreach=False
    )
    model = evaluator.model
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    curve: list[dict[str, float]] = []
    try:
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * warmup_decay(step, cfg.steps, cfg.warmup_frac)
            gates = heaviside(tau, temperature=cfg.heaviside_temp)
            chunk = PromptSet.of(train.chunks[step % len(train.chunks)])
            task = chunk.loss(evaluator.logits_fn(gates, skip_full=False))
            n_active = gates.sum()
            k_coef = cfg.k_coef * min(1.0, (step + 1) / max(1, cfg.penalty_warmup_frac * cfg.steps))
            loss = task + k_coef * n_active
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                rms = tau.grad.pow(2).mean().sqrt()
                if rms > 1:  # clip the gradient to RMS 1
                    tau.grad.div_(rms)
            opt.step()
            with torch.no_grad():
                tau.clamp_(-1.0, 1.0)
            rec = {"step": step + 1, "task_loss": task.item(), "n_active": n_active.item()}
            curve.append(rec)
            if on_step is not None:
                on_step(step + 1, rec)
    finally:
        for p, req in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(req)
    return tau.detach().cpu(), curve


def bisect_k(
    loss_at: Callable[[int], float], *, lo: int, hi: int, target: float, max_iters: int
) -> tuple[int, bool, dict[int, float]]:
    """Smallest k in [lo, hi] with ``loss_at(k) <= target``, assuming loss falls with k.

    If even ``hi`` misses the target, returns (hi, False). Returns (k, reached, {k: loss}).
    """
    seen: dict[int, float] = {}

    def f(k: int) -> float:
        if k not in seen:
            seen[k] = loss_at(k)
        return seen[k]

    if f(hi) > target:
        return hi, False, seen
    if f(lo) <= target:
        return lo, True, seen
    for _ in range(max_iters):  # invariant: f(lo) > target >= f(hi)
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if f(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi, True, seen


def cut_k(
    loss_at: Callable[[int], float], *, n_on: int, total: int, target: float, max_iters: int
) -> tuple[int, bool]:
    """The fewest top-k nodes (of a node order) whose loss ``loss_at(k)`` is <= ``target``:
    search [1, n_on] first (the nodes the mask left on); if the mask's own set misses, double k
    until the target is met or every node is kept, then bisect the last doubling. Returns
    (k, reached)."""
    lo, hi = 1, max(1, n_on)
    while loss_at(hi) > target and hi < total:
        lo, hi = hi, min(total, 2 * hi)
    k, reached, _ = bisect_k(loss_at, lo=lo, hi=hi, target=target, max_iters=max_iters)
    return k, reached


def prune(
    evaluator: CircuitEvaluator,
    train: PromptSet,
    judge: PromptSet,
    cfg: PruneConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> PruneResult:
    """Train masks on minibatches of ``train``, then bisect on k judging the loss on all of
    ``judge`` (the same pairs, packed by length; see the module docstring)."""
    start = time.perf_counter()
    space = evaluator.space
    loss_full, _ = evaluator.loss(judge, torch.ones(space.total))
    tau, curve = train_masks(evaluator, train, cfg, on_step=on_step)
    trained = time.perf_counter()
    # Stable descending order: ties (e.g. all clamped at -1) keep forward order.
    order = torch.sort(-tau, stable=True).indices
    n_on = int((tau >= 0).sum())
    calibrations: dict[int, Calibration | None] = {}
    seen: dict[int, float] = {}

    def loss_at(k: int) -> float:
        if k not in seen:
            loss, calibrations[k] = evaluator.loss(
                judge, gates_for(space, order[:k]), calibration=cfg.calibrate
            )
            seen[k] = loss
        return seen[k]

    k, reached = cut_k(loss_at, n_on=n_on, total=space.total, target=cfg.target_loss,
                       max_iters=cfg.max_bisect_iters)  # fmt: skip
    # The bisection's points plus a few more give the loss-vs-k curve (k/4 ... 4k).
    for kk in sorted({max(1, k // 4), max(1, k // 2), 2 * k, 4 * k}):
        if kk <= space.total and kk not in seen:
            seen[kk] = loss_at(kk)
    loss_circuit = seen[k]
    cal = calibrations.get(k)
    log.info(
        "pruned to %d of %d nodes (loss %.4f, full model %.4f, target %.3f%s); mask training "
        "%.1f s, bisection %.1f s (%d evaluations)",
        k,
        space.total,
        loss_circuit,
        loss_full,
        cfg.target_loss,
        "" if reached else ", NOT reached",
        trained - start,
        time.perf_counter() - trained,
        len(seen),
    )
    return PruneResult(
        config=cfg,
        space=space,
        tau=tau,
        order=order,
        k=k,
        reached=reached,
        loss_full=loss_full,
        loss_circuit=loss_circuit,
        calibration=cal,
        curve=curve,
        k_curve=sorted(seen.items()),
        seconds=time.perf_counter() - start,
    )


def geometric_mean(values: list[float]) -> float:
    """Geometric mean of positive values (nan when empty)."""
    if not values:
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))
