"""Verdicts of the faithfulness checks: their thresholds, the pure decision rules, bootstrap
intervals over prompts, and the result record every check returns.

Each decision rule is a small pure function so that a test can feed it numbers on both sides of
its threshold (a mutated criterion must fail a test). A verdict is one of ``PASS``, ``FAIL``,
``N/A`` (the check does not apply, e.g. necessity of a circuit that misses its target) or
``INFO`` (reported without a verdict of its own). A verdict whose 95% bootstrap interval over
prompts straddles its threshold is marked ``uncertain``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from sparsecircuits.tasks.metrics import CHANCE_LOSS

Verdict = Literal["PASS", "FAIL", "N/A", "INFO"]

CHANCE = CHANCE_LOSS  # nats per prompt: the two-token loss of a coin flip
NECESSITY_MIN_FRACTION = 0.5  # share of the full model's margin over chance the ablation removes
NECESSITY_MIN_MARGIN = 0.1  # nats: a full model closer to chance than this has nothing to remove
SIZE_RATIO = 2.0  # controls / random init must need this many times the circuit's nodes
MIN_JACCARD = 0.5  # mean pairwise overlap of the seeds' node sets
MAX_RHO = -0.8  # Spearman rho of the relaxation curve
FLAT_TOL = 0.05  # nats: a relaxation curve this close to the full model is flat, not wrong
MAX_RISE = 0.05  # nats: how far the relaxation curve may rise above both of its endpoints
SWAP_MIN_SHARE = 0.95  # share of swapped node sets that must do worse than the circuit
MIN_FOLLOW = 0.8  # interchange: share of patched prompts that must follow the source's answer
N_BOOT = 1000  # bootstrap resamples


def check_result(
    name: str, verdict: Verdict, criterion: str, summary: str, **numbers: Any
) -> dict[str, Any]:
    """A check's result: name, verdict, ``passed`` (True / False / None for N/A and INFO),
    ``uncertain``, criterion and summary first, then its numbers. An ``interval`` among the
    numbers is [lo, hi] of the 95% bootstrap interval of the judged statistic."""
    passed = {"PASS": True, "FAIL": False}.get(verdict)
    uncertain = bool(numbers.pop("uncertain", False)) and passed is not None
    return {"name": name, "verdict": verdict, "passed": passed, "uncertain": uncertain,
            "criterion": criterion, "summary": summary, **numbers}  # fmt: skip


def verdict(ok: bool) -> Verdict:
    return "PASS" if ok else "FAIL"


# ----------------------------------------------------------------------------- bootstrap
def bootstrap(
    stat: Callable[[torch.Tensor], torch.Tensor], n: int, *, seed: int = 0, n_boot: int = N_BOOT
) -> tuple[float, float]:
    """95% percentile interval of ``stat`` over prompt resamples. ``stat(idx)`` takes a
    (n_boot, n) index tensor of resampled prompt positions and returns (n_boot,) statistics."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    values = stat(idx).double()
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def mean_interval(values: torch.Tensor, *, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean of per-prompt ``values`` (n,)."""
    v = values.double()
    return bootstrap(lambda idx: v[idx].mean(1), len(v), seed=seed)


def straddles(interval: tuple[float, float], threshold: float) -> bool:
    """Whether ``threshold`` lies inside the closed interval."""
    return interval[0] <= threshold <= interval[1]


# ----------------------------------------------------------------------------- decision rules
def sufficient(loss: float, target: float) -> bool:
    """Sufficiency: the circuit's held-out loss is at or below the target."""
    return loss <= target


def necessity_fraction(loss_ablated: float, loss_full: float) -> float:
    """How much of the full model's margin over chance ablating the circuit removes:
    (L_ablated - L_full) / (ln 2 - L_full); 1 = down to chance, > 1 = worse than chance."""
    return (loss_ablated - loss_full) / (CHANCE - loss_full)


def necessity_applies(loss_full: float, circuit_reached_test: bool) -> bool:
    """Necessity is judged only for circuits that reach the target on held-out templates, in a
    model that does the task (its loss at least NECESSITY_MIN_MARGIN below chance)."""
    return circuit_reached_test and loss_full <= CHANCE - NECESSITY_MIN_MARGIN


def necessary(fraction: float) -> bool:
    return fraction >= NECESSITY_MIN_FRACTION


def beats_all(loss: float, others: Sequence[float]) -> bool:
    """The circuit's loss is strictly below every other node set's."""
    return all(loss < x for x in others)


def beats_share(loss: float, others: Sequence[float], *, share: float = SWAP_MIN_SHARE) -> bool:
    """The circuit's loss is strictly below at least ``share`` of the other node sets'."""
    return sum(loss < x for x in others) >= share * len(others)


def missed_or_larger(reached: bool, n_nodes: int, n_circuit: int, *, ratio: float) -> bool:
    """A re-prune (control or random weights) missed its target or needed >= ``ratio`` x the
    circuit's nodes."""
    return (not reached) or n_nodes >= ratio * n_circuit


def relaxation_ok(fractions: Sequence[float], losses: Sequence[float], loss_full: float) -> dict:
    """Mask relaxation's rule: switching pruned nodes back on moves the loss toward the full
    model's (Spearman rho of fraction vs distance <= MAX_RHO, or the curve stays within
    FLAT_TOL of the full model) AND the curve never rises more than MAX_RISE above both of its
    endpoints (a bump means some pruned nodes work against the circuit). Returns rho, flat,
    rise and ok."""
    dist = [abs(x - loss_full) for x in losses]
    rho = spearman(list(fractions), dist)
    flat = max(dist) <= FLAT_TOL
    rise = max(losses) - max(losses[0], losses[-1])
    toward = flat or (not math.isnan(rho) and rho <= MAX_RHO)
    return {"rho": rho, "flat": flat, "max_rise": rise, "ok": toward and rise <= MAX_RISE}


def stable(jaccard_mean: float) -> bool:
    return jaccard_mean >= MIN_JACCARD


def follows(share: float) -> bool:
    """Interchange: enough patched prompts follow the source prompt's answer."""
    return share >= MIN_FOLLOW


# ----------------------------------------------------------------------------- statistics
def jaccard(a: set[int], b: set[int]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):  # ties share their average rank
            ranks[order[m]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (ties averaged); nan when either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan
