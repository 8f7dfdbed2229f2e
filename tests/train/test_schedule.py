import itertools
import math

import pytest

from sparsecircuits.train.config import OptimConfig, SparsityConfig
from sparsecircuits.train.schedule import l0_fraction, lr_at


def test_linear_anneal_endpoints_and_midpoint():
    cfg = SparsityConfig(target_l0=1 / 32, anneal_start=0.01, anneal_end=0.5)
    total = 1000
    assert l0_fraction(0, total, cfg) == 1.0  # before the anneal starts
    assert l0_fraction(499, total, cfg) == 1 / 32  # exactly the target at anneal_end
    assert l0_fraction(999, total, cfg) == 1 / 32
    mid = l0_fraction(254, total, cfg)  # t = 0.255, halfway through [0.01, 0.5]
    assert mid == pytest.approx(1 - (1 - 1 / 32) * 0.5, rel=1e-9)
    fracs = [l0_fraction(s, total, cfg) for s in range(total)]
    assert all(a >= b for a, b in itertools.pairwise(fracs))  # monotone


def test_exponential_anneal_is_geometric():
    cfg = SparsityConfig(target_l0=1 / 64, anneal_start=0.0, anneal_end=1.0, anneal="exponential")
    assert l0_fraction(49, 100, cfg) == pytest.approx((1 / 64) ** 0.5)


def test_dense_target_never_anneals():
    cfg = SparsityConfig(target_l0=1.0)
    assert {l0_fraction(s, 50, cfg) for s in range(50)} == {1.0}


def test_sharkfin_lr_warmup_decay_and_factor():
    opt = OptimConfig(lr=1e-3, warmup_frac=0.1)
    total = 100
    assert lr_at(0, total, opt, 1.0) == pytest.approx(1e-4)  # 1/10 of warmup
    assert lr_at(9, total, opt, 1.0) == pytest.approx(1e-3)  # end of warmup
    assert lr_at(55, total, opt, 1.0) == pytest.approx(1e-3 * 45 / 90)  # linear decay
    # the sharkfin factor 1/sqrt(L0 fraction)
    assert lr_at(55, total, opt, 1 / 16) == pytest.approx(4 * lr_at(55, total, opt, 1.0))
    no_fin = OptimConfig(lr=1e-3, warmup_frac=0.1, sharkfin=False)
    assert lr_at(55, total, no_fin, 1 / 16) == pytest.approx(lr_at(55, total, opt, 1.0))
    assert math.isclose(lr_at(total - 1, total, opt, 1.0), 1e-3 / 90)
