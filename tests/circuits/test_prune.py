"""Pruning: bisection on k, logit calibration, and mask training on a tiny model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from sparsecircuits.circuits import pipeline
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.prune import (
    CircuitEvaluator,
    PruneConfig,
    bisect_k,
    cut_k,
    gates_for,
    prune,
    train_masks,
)

TASK = "single_double_quote"
BASE = PruneConfig(
    steps=10, n_train_pairs=8, n_test_pairs=8, batch_pairs=4, ablation="zero", lr=0.05
)


# ------------------------------------------------------------------------------ bisect_k
def _step(k_star: float, hi_loss: float = 1.0):
    """A monotone loss: ``hi_loss`` below ``k_star``, 0 from ``k_star`` on (decreasing in k)."""
    return lambda k: hi_loss if k < k_star else 0.0


@pytest.mark.parametrize(
    ("loss", "lo", "hi", "want_k", "want_reached"),
    [
        (_step(37), 1, 100, 37, True),
        (_step(2), 1, 100, 2, True),
        (_step(100), 1, 100, 100, True),  # only the top of the range reaches it
        (_step(99), 1, 100, 99, True),
        (_step(1), 1, 100, 1, True),  # reached at lo
        (_step(0), 5, 9, 5, True),  # reached at lo > 1
        (_step(101), 1, 100, 100, False),  # never reached
        (_step(math.inf), 3, 3, 3, False),  # hi == lo, missed
        (_step(3), 3, 3, 3, True),  # hi == lo, reached
        (lambda k: 10.0 / k, 1, 1000, 67, True),  # smooth: 10/k <= 0.15 from k = 67
        (_step(513), 1, 1024, 513, True),
    ],
)
def test_bisect_finds_smallest_k(loss, lo, hi, want_k, want_reached):
    calls: list[int] = []

    def loss_at(k: int) -> float:
        assert lo <= k <= hi
        calls.append(k)
        return loss(k)

    k, reached, seen = bisect_k(loss_at, lo=lo, hi=hi, target=0.15, max_iters=50)
    assert (k, reached) == (want_k, want_reached)
    assert len(calls) == len(set(calls)) == len(seen)  # each k evaluated once
    assert len(calls) <= math.ceil(math.log2(hi - lo + 1)) + 2
    if reached:
        assert seen[k] <= 0.15 and (k == lo or seen[k - 1] > 0.15)


@pytest.mark.parametrize(
    ("n_on", "true_k", "total", "want"),
    [(10, 4, 100, (4, True)), (10, 37, 100, (37, True)), (10, 100, 100, (100, True)),
     (3, 101, 100, (100, False)), (0, 1, 100, (1, True))],
)  # fmt: skip
def test_cut_k_doubles_past_the_mask_then_bisects(n_on, true_k, total, want):
    """Loss falls below the target first at ``true_k``: found inside [1, n_on] or by doubling
    past it; a target no k meets keeps every node and says so."""
    calls: list[int] = []

    def loss_at(k: int) -> float:
        calls.append(k)
        return 0.1 if k >= true_k else 1.0

    assert cut_k(loss_at, n_on=n_on, total=total, target=0.15, max_iters=50) == want
    assert max(calls) <= total


def test_bisect_stops_after_max_iters():
    k, reached, seen = bisect_k(_step(500), lo=1, hi=1024, target=0.5, max_iters=3)
    assert reached and len(seen) == 2 + 3 and seen[k] <= 0.5


# ----------------------------------------------------------------------------- calibration


# ------------------------------------------------------------------------ training + prune
@dataclass
class Setup:
    ev: CircuitEvaluator
    data: pipeline.TaskData
    space: NodeSpace


@pytest.fixture(scope="module")
def setup(circuit_model_dir) -> Setup:
    lm = pipeline.load_for_circuits(str(circuit_model_dir))
    data = pipeline.task_data(lm, TASK, BASE)
    space = NodeSpace(lm.model.config)
    ablation = pipeline.ablation_values(lm, space, BASE.ablation, data.train_batch)
    return Setup(CircuitEvaluator(lm.model, space=space, ablation=ablation), data, space)


def test_prune_is_deterministic_for_a_seed(setup):
    a = prune(setup.ev, setup.data.train, setup.data.judge, BASE)
    b = prune(setup.ev, setup.data.train, setup.data.judge, BASE)
    assert torch.equal(a.tau, b.tau) and torch.equal(a.order, b.order)
    assert (a.k, a.loss_circuit, a.k_curve) == (b.k, b.loss_circuit, b.k_curve)
    c = prune(setup.ev, setup.data.train, setup.data.judge, BASE.replace(seed=1))
    assert not torch.equal(a.tau, c.tau)


def test_train_masks_curve_and_model_left_frozen(setup):
    model = setup.ev.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tau, curve = train_masks(setup.ev, setup.data.train, BASE)
    assert tau.shape == (setup.space.total,) and not tau.requires_grad
    assert float(tau.abs().max()) <= 1.0  # clamped to [-1, 1]
    assert [r["step"] for r in curve] == list(range(1, BASE.steps + 1))
    assert all(0 <= r["n_active"] <= setup.space.total for r in curve)
    assert curve[0]["n_active"] == setup.space.total  # tau starts at +0.1: every node on
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in model.parameters())


def test_tau_clamp_binds(setup):
    """With a large learning rate tau would leave [-1, 1]; the clamp must hold it at the
    bounds (removing the clamp fails this test)."""
    cfg = BASE.replace(lr=0.5, steps=30, warmup_frac=0.0, k_coef=0.05)
    tau, _ = train_masks(setup.ev, setup.data.train, cfg)
    assert float(tau.max()) <= 1.0 and float(tau.min()) >= -1.0
    assert int((tau == -1.0).sum()) > 0  # the bound was reached, so the clamp acted


def test_prune_reaches_loose_target_with_smallest_k(setup):
    ev, judge = setup.ev, setup.data.judge
    full = ev.loss(judge, torch.ones(setup.space.total))[0]
    target = full + 0.01  # above the full model's loss: reachable
    res = prune(ev, setup.data.train, judge, BASE.replace(target_loss=target))
    assert res.reached and res.loss_full == pytest.approx(full)
    assert res.loss_circuit <= target
    assert len(res.kept) == res.k and torch.equal(res.kept, res.order[: res.k].sort().values)
    # The reported loss is the circuit's loss, recomputed independently.
    assert ev.loss(judge, gates_for(setup.space, res.kept))[0] == pytest.approx(res.loss_circuit)
    seen = dict(res.k_curve)
    assert seen[res.k] == res.loss_circuit
    n_on = int((res.tau >= 0).sum())
    # Either the mask's own node set sufficed (k within it), or the search had to widen.
    assert res.k <= max(1, n_on) or seen[max(1, n_on)] > target
    if res.k > 1:  # the bisection proved k - 1 nodes miss the target
        assert seen[res.k - 1] > target
    assert [k for k, _ in res.k_curve] == sorted(seen)


def test_prune_unreachable_target_reports_missed(setup):
    res = prune(setup.ev, setup.data.train, setup.data.judge, BASE.replace(target_loss=1e-6))
    assert not res.reached and res.k == setup.space.total
    assert res.loss_circuit == pytest.approx(res.loss_full)


def test_higher_k_coef_leaves_fewer_active_nodes(setup):
    active = []
    for k_coef in (0.0, 1e-3, 0.1):
        tau, _ = train_masks(setup.ev, setup.data.train, BASE.replace(k_coef=k_coef))
        active.append(int((tau >= 0).sum()))
    assert active[0] >= active[1] >= active[2]
    assert active[0] > setup.space.total // 2 and active[2] < active[0] // 4
