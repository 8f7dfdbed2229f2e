"""A small hyperparameter search around a pruning config, under a trial and time budget.

Not CARBS: seeded random trials around the centre (k_coef and lr log-uniform within 3x and 2x,
steps from {1/2, 1, 2} x), keeping the smallest circuit that reaches the target (or, if none
does, the lowest loss). The centre itself is always trial 0.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from sparsecircuits.circuits.prune import PruneConfig, PruneResult

log = logging.getLogger(__name__)


@dataclass
class Trial:
    config: PruneConfig
    n_nodes: int
    loss: float
    reached: bool
    seconds: float


def suggest(center: PruneConfig, rng: random.Random) -> PruneConfig:
    """One random configuration near ``center``."""

    def log_uniform(v: float, spread: float) -> float:
        return math.exp(rng.uniform(math.log(v / spread), math.log(v * spread)))

    return center.replace(
        k_coef=log_uniform(center.k_coef, 3.0) if center.k_coef > 0 else 0.0,
        lr=log_uniform(center.lr, 2.0),
        steps=max(1, int(center.steps * rng.choice((0.5, 1.0, 2.0)))),
    )


def better(a: Trial, b: Trial | None) -> bool:
    """Whether trial ``a`` beats ``b``: reaching the target first, then fewer nodes, then loss."""
    if b is None:
        return True
    if a.reached != b.reached:
        return a.reached
    if a.reached:
        return (a.n_nodes, a.loss) < (b.n_nodes, b.loss)
    return a.loss < b.loss


def search(
    run: Callable[[PruneConfig], PruneResult],
    center: PruneConfig,
    *,
    trials: int,
    budget_s: float,
) -> tuple[PruneResult, list[Trial]]:
    """Run up to ``trials`` configs (centre first) while under ``budget_s`` seconds; returns the
    best result and every trial."""
    rng = random.Random(center.seed)
    start = time.perf_counter()
    best: tuple[Trial, PruneResult] | None = None
    history: list[Trial] = []
    for i in range(trials):
        if i and time.perf_counter() - start > budget_s:
            log.info("search budget of %.0f s spent after %d trials", budget_s, i)
            break
        cfg = center if i == 0 else suggest(center, rng)
        t0 = time.perf_counter()
        res = run(cfg)
        trial = Trial(cfg, res.k, res.loss_circuit, res.reached, time.perf_counter() - t0)
        history.append(trial)
        log.info(
            "trial %d: k_coef %.2e lr %.2e steps %d -> %d nodes, loss %.4f%s",
            i,
            cfg.k_coef,
            cfg.lr,
            cfg.steps,
            res.k,
            res.loss_circuit,
            "" if res.reached else " (target missed)",
        )
        if better(trial, best[0] if best else None):
            best = (trial, res)
    assert best is not None  # trials >= 1 is validated by the caller
    return best[1], history
