"""The checks' decision rules on numbers either side of each threshold (a mutated criterion,
an always-pass, or an ignored statistic fails here), the bootstrap intervals, and the random
node sets the null checks draw."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecircuits.circuits import verdicts as V
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.verify_tools import matched_random_sets, swapped_sets
from sparsecircuits.model import GPTConfig


def test_sufficiency_rule():
    assert V.sufficient(0.149, 0.15) and V.sufficient(0.15, 0.15)
    assert not V.sufficient(0.151, 0.15)


def test_necessity_is_relative_to_the_full_model_and_chance():
    assert V.necessity_fraction(V.CHANCE, 0.1) == pytest.approx(1.0)
    assert V.necessity_fraction(0.1, 0.1) == 0.0
    assert V.necessary(0.5) and V.necessary(1.3) and not V.necessary(0.49)
    # 0.6 nats of loss is necessity for a model at 0.02, not for one at 0.55.
    assert V.necessary(V.necessity_fraction(0.6, 0.02))
    assert not V.necessary(V.necessity_fraction(0.6, 0.55))
    assert V.necessity_applies(0.02, True)
    assert not V.necessity_applies(0.02, False)  # circuit missed the held-out target
    assert not V.necessity_applies(V.CHANCE - 0.05, True)  # the model cannot do the task


def test_comparison_rules():
    assert V.beats_all(0.1, [0.2, 0.3]) and not V.beats_all(0.2, [0.2, 0.3])
    assert not V.beats_all(0.25, [0.2, 0.3])
    assert V.beats_share(0.1, [0.2] * 19 + [0.05])  # 95% of 20
    assert not V.beats_share(0.1, [0.2] * 18 + [0.05] * 2)


def test_size_ratio_rule():
    assert V.missed_or_larger(False, 10, 50, ratio=2.0)  # missed: passes whatever its size
    assert V.missed_or_larger(True, 100, 50, ratio=2.0)
    assert not V.missed_or_larger(True, 99, 50, ratio=2.0)


def test_relaxation_rule_uses_its_rise():
    fr = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert V.relaxation_ok(fr, [0.15, 0.10, 0.06, 0.03, 0.02], 0.02)["ok"]  # monotone
    assert V.relaxation_ok(fr, [0.03, 0.04, 0.02, 0.03, 0.02], 0.02)["ok"]  # flat
    bump = V.relaxation_ok(fr, [0.15, 0.40, 0.06, 0.03, 0.02], 0.02)
    assert not bump["ok"] and bump["max_rise"] == pytest.approx(0.25)
    away = V.relaxation_ok(fr, [0.15, 0.2, 0.25, 0.3, 0.02], 0.02)
    assert not away["ok"]


def test_stability_and_interchange_rules():
    assert V.stable(0.5) and not V.stable(0.49)
    assert V.follows(0.8) and not V.follows(0.79)


def test_bootstrap_interval_and_straddling():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=gen) * 0.1 + 1.0
    lo, hi = V.mean_interval(x)
    assert lo < float(x.mean()) < hi and hi - lo < 0.05
    assert V.mean_interval(x) == (lo, hi)  # seeded
    assert V.straddles((lo, hi), float(x.mean())) and not V.straddles((lo, hi), 2.0)
    record = V.check_result("x", "PASS", "c", "s", uncertain=True)
    assert record["passed"] is True and record["uncertain"]
    assert V.check_result("x", "N/A", "c", "s", uncertain=True)["uncertain"] is False


def test_statistics():
    assert V.jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert V.spearman([0, 1, 2, 3], [5, 3, 2, 0]) == pytest.approx(-1.0)
    assert math.isnan(V.spearman([0, 1, 2], [1, 1, 1]))


def _space() -> NodeSpace:
    return NodeSpace(GPTConfig(vocab_size=64, n_layer=2, d_model=16, n_head=2, d_head=4, d_mlp=8))


def _histogram(space: NodeSpace, flat: torch.Tensor) -> list[int]:
    return [int(((flat >= g.offset) & (flat < g.offset + g.size)).sum()) for g in space.groups]


def test_random_sets_match_the_circuits_histogram():
    space = _space()
    kept = torch.tensor([0, 3, 20, 100, 101, 150])
    sets = matched_random_sets(space, kept, n=30, gen=torch.Generator().manual_seed(0))
    assert all(_histogram(space, s) == _histogram(space, kept) for s in sets)
    assert len({tuple(s.tolist()) for s in sets}) > 20


def test_swapped_sets_swap_within_groups():
    space = _space()
    kept = torch.tensor([0, 3, 20, 100, 101, 150])
    for s in swapped_sets(space, kept, k=2, n=20, gen=torch.Generator().manual_seed(1)):
        assert _histogram(space, s) == _histogram(space, kept)
        assert len(set(s.tolist()) - set(kept.tolist())) == 2


def test_report_order_names_every_check_once():
    """CHECKS (the report order) and the check functions must list the same checks."""
    from sparsecircuits.circuits.verify import CHECKS, check_fns

    assert list(CHECKS) == list(check_fns())
