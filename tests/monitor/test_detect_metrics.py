"""Detection metrics against hand-computed values (scikit-learn is not installed; where it is,
AUROC is also compared with ``roc_auc_score``), and the logistic regression at its optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecircuits.monitor.detect_metrics import (
    auroc,
    bootstrap,
    fit_logistic,
    logistic_objective,
    threshold_at_fpr,
    tpr_at_fpr,
)


def test_auroc_hand_values():
    # Pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4): 3 of 4.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    # Ties count 1/2: pos {1, 2}, neg {1, 0}: (1 vs 1) 0.5, (1 vs 0) 1, (2 vs 1) 1, (2 vs 0) 1.
    assert auroc([1, 2, 1, 0], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert auroc([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5


def test_auroc_matches_pairwise_count_and_sklearn():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 60).astype(float)  # many ties
    y = rng.integers(0, 2, 60)
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auroc(s, y) == pytest.approx(pairs / (len(pos) * len(neg)))
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn not installed")
    assert auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s))


def test_tpr_at_fpr_hand_values():
    neg = list(range(100))  # 0..99
    pos = [99.5, 98.5, 98, 50, 10]
    s, y = neg + pos, [0] * 100 + [1] * 5
    # 1% of 100 negatives: one may be flagged; the threshold is the 2nd largest negative, 98.
    assert threshold_at_fpr(s, y, 0.01) == 98
    assert tpr_at_fpr(s, y, 0.01) == pytest.approx(2 / 5)  # 99.5, 98.5 (98 is not > 98)
    # 0% FPR: threshold at the largest negative (99): only 99.5 is above it.
    assert tpr_at_fpr(s, y, 0.0) == pytest.approx(1 / 5)
    # 5%: 5 negatives may be flagged (95..99): threshold 94, flags 99.5, 98.5, 98.
    assert threshold_at_fpr(s, y, 0.05) == 94
    assert tpr_at_fpr(s, y, 0.05) == pytest.approx(3 / 5)


def test_tpr_at_fpr_never_exceeds_the_fpr_with_ties():
    s = [1.0] * 50 + [1.0, 2.0]
    y = [0] * 50 + [1, 1]
    t = threshold_at_fpr(s, y, 0.01)
    assert t == 1.0  # every negative tied at the threshold: none flagged
    assert tpr_at_fpr(s, y, 0.01) == 0.5


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc([1, 2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([1, 2], [0, 2])
    with pytest.raises(ValueError, match="differ"):
        auroc([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        auroc([np.nan, 1], [0, 1])
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr([1, 2], [0, 1], 1.0)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(200), np.zeros(200)].astype(int)
    s = rng.normal(size=400) + y  # AUROC about 0.76
    a = bootstrap(auroc, s, y, n_boot=200, seed=3)
    b = bootstrap(auroc, s, y, n_boot=200, seed=3)
    c = bootstrap(auroc, s, y, n_boot=200, seed=4)
    assert a == b and a != c
    assert a.value == pytest.approx(auroc(s, y))
    assert a.lo < a.value < a.hi
    assert 0.02 < a.hi - a.lo < 0.2  # about 2 * 1.96 * 0.024 for this n
    assert "[" in a.fmt()


def test_bootstrap_of_a_perfect_separation_is_degenerate():
    est = bootstrap(auroc, [0, 1, 2, 3], [0, 0, 1, 1], n_boot=50, seed=0)
    assert (est.value, est.lo, est.hi) == (1.0, 1.0, 1.0)


def test_logistic_regression_reaches_the_optimum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)) * [1, 10, 0.1, 1, 1] + [0, 5, 0, 0, 0]
    x[:, 4] = 3.0  # a constant feature: standardised with sd 1, its weight stays 0
    w_true = np.array([2.0, 0.3, -20.0, 0.0, 0.0])
    y = (rng.random(300) < 1 / (1 + np.exp(-(x @ w_true - 1.5)))).astype(int)
    l2 = 0.05
    m = fit_logistic(x, y, l2=l2)
    # The gradient of the objective vanishes at the fitted parameters (strictly convex).
    z = torch.from_numpy((x - m.mu) / m.sd)
    w = torch.tensor(m.w, requires_grad=True)
    b = torch.tensor(m.b, dtype=torch.float64, requires_grad=True)
    logistic_objective(w, b, z, torch.from_numpy(y.astype(float)), l2).backward()
    assert float(w.grad.abs().max()) < 1e-6 and abs(float(b.grad)) < 1e-6
    assert m.w[4] == pytest.approx(0.0, abs=1e-9)
    assert m.w[0] > 0 and m.w[2] < 0  # the signs of the true weights
    assert auroc(m.decision(x), y) > 0.85


def test_logistic_regression_on_separable_data_stays_finite():
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    m = fit_logistic(x, [0, 0, 1, 1], l2=1e-2)
    d = m.decision(x)
    assert np.isfinite(d).all() and (d[:2] < 0).all() and (d[2:] > 0).all()
    assert m.b == pytest.approx(0.0, abs=1e-6)  # symmetric data: no intercept
    with pytest.raises(ValueError, match="l2"):
        fit_logistic(x, [0, 0, 1, 1], l2=0)
