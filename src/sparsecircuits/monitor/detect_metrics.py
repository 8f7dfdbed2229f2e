"""Detection metrics for the monitor benchmarks: AUROC, TPR at a fixed FPR, stratified
bootstrap confidence intervals, and a small L2 logistic regression (the dense-probe baseline;
scikit-learn is not a dependency).

Conventions: ``scores`` (n,) float, higher means "more likely an attack"; ``labels`` (n,) in
{0, 1}, 1 = attack (positive). Every function takes anything ``np.asarray`` accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Metric = Callable[[np.ndarray, np.ndarray], float]


def _check(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    y = y.astype(np.int64)
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("need at least one positive and one negative item")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y


def _ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as the Mann-Whitney U test)."""
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    # Runs of equal values share the mean of the 1-based ranks they span, (start + 1 + end) / 2
    # (vectorised: the bootstrap calls this thousands of times).
    new_run = np.r_[True, np.diff(sorted_s) != 0]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(s)]
    run = np.cumsum(new_run) - 1
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[run]
    return ranks


def auroc(scores: object, labels: object) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative),
    ties counting 1/2 (the Mann-Whitney U statistic / (n_pos * n_neg)). 0.5 is chance."""
    s, y = _check(scores, labels)
    r = _ranks(s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    u = r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def threshold_at_fpr(scores: object, labels: object, fpr: float = 0.01) -> float:
    """The threshold t such that flagging ``score > t`` flags at most ``floor(fpr * n_neg)``
    negatives: the (m+1)-th largest negative score, m = floor(fpr * n_neg). Strict ``>``
    means tied negatives at t are not flagged, so the realised FPR never exceeds ``fpr``."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    s, y = _check(scores, labels)
    neg = np.sort(s[y == 0])[::-1]
    m = int(np.floor(fpr * len(neg) + 1e-9))  # + eps: 0.01 * 1000 is 9.999... in binary
    return float(neg[m])


def tpr_at_fpr(scores: object, labels: object, fpr: float = 0.01) -> float:
    """Share of positives flagged at :func:`threshold_at_fpr` (``score > t``). With fewer than
    1 / fpr negatives, m is 0 and this is the TPR at zero false positives."""
    s, y = _check(scores, labels)
    t = threshold_at_fpr(s, y, fpr)
    return float((s[y == 1] > t).mean())


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap percentile interval [lo, hi]."""

    value: float
    lo: float
    hi: float

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def bootstrap(
    metric: Metric,
    scores: object,
    labels: object,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """``metric(scores, labels)`` with a percentile bootstrap interval: ``n_boot`` resamples of
    the items with replacement, *stratified* by label (positives and negatives resampled
    separately, so every resample keeps the split's class counts and the metric is defined).
    Seeded: the same seed gives the same interval."""
    s, y = _check(scores, labels)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    yb = np.r_[np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)]
    vals = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        vals[i] = metric(s[idx], yb)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(vals, [a, 1.0 - a])
    return Estimate(metric(s, y), float(lo), float(hi))


@dataclass(frozen=True)
class LogisticModel:
    """A fitted logistic regression on standardised features: logit = ((x - mu) / sd) @ w + b.
    Arrays are float64; ``mu``/``sd`` (d,) come from the training features."""

    w: np.ndarray
    b: float
    mu: np.ndarray
    sd: np.ndarray

    def decision(self, x: object) -> np.ndarray:
        """Logits (n,) (log-odds of the positive class) of features ``x`` (n, d)."""
        z = (np.asarray(x, dtype=np.float64) - self.mu) / self.sd
        return z @ self.w + self.b


def logistic_objective(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float
) -> torch.Tensor:
    """The objective :func:`fit_logistic` minimises: mean binary cross-entropy (nats) +
    ``l2 / 2 * |w|^2`` (the intercept is not penalised)."""
    logits = x @ w + b
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return bce + 0.5 * l2 * (w * w).sum()


def fit_logistic(
    x: object, y: object, *, l2: float = 1e-2, max_iter: int = 500, tol: float = 1e-10
) -> LogisticModel:
    """L2-regularised logistic regression fitted by full-batch L-BFGS (float64, strong Wolfe
    line search). Features are standardised with the training mean and std (a constant
    feature gets sd 1), so ``l2`` is per standardised unit. ``l2`` must be > 0 (the problem
    is then strictly convex with a unique optimum, also on separable data)."""
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.ndim != 2 or xa.shape[0] != len(ya):
        raise ValueError(f"x must be (n, d) with n = len(y); got {xa.shape} and {len(ya)}")
    mu = xa.mean(0)
    sd = xa.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    xt = torch.from_numpy((xa - mu) / sd)
    yt = torch.from_numpy(ya)
    w = torch.zeros(xa.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=tol * 1e-2, history_size=20,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = logistic_objective(w, b, xt, yt, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticModel(w.detach().numpy().copy(), float(b.detach()), mu, sd)
