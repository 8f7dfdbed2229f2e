"""Baselines equal numpy's statistics of the same engagements; the k-of-n rule fires exactly
when it should; a baseline for another catalogue is refused."""

from __future__ import annotations

import numpy as np
import pytest

from sparsecircuits.circuits.means import pretrain_windows
from sparsecircuits.errors import CheckpointError
from sparsecircuits.interop.download import file_sha256
from sparsecircuits.monitor.calibrate import (
    SIGMA_FLOOR,
    KOfN,
    calibrate,
    family_engagements,
    load_baseline,
    robust_stats,
    save_baseline,
)
from sparsecircuits.monitor.catalog import CATALOG_FILE


def test_baseline_numbers_are_numpys(planted, catalog, catalog_dir, tmp_path):
    sha = file_sha256(catalog_dir / CATALOG_FILE)
    base = calibrate(planted.model, planted.tokenizer, catalog, catalog_sha256=sha, windows=3)
    windows = pretrain_windows(planted.tokenizer, n_windows=3,
                               length=planted.model.config.block_size)  # fmt: skip
    e = family_engagements(planted.model, catalog, windows)["quotes"]
    assert e.shape == (3 * planted.model.config.block_size,)
    b = base.families["quotes"]
    med = np.median(e)
    mad = np.median(np.abs(e - med))
    assert b.n_tokens == len(e) and b.median == pytest.approx(med, abs=0, rel=1e-12)
    assert b.mad == pytest.approx(mad, rel=1e-12)
    assert b.sigma == pytest.approx(max(1.4826 * mad, SIGMA_FLOOR), rel=1e-12)
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999)):
        assert getattr(b, key) == pytest.approx(np.quantile(e, q), rel=1e-12), key
    assert set(base.families) == {"quotes"}  # the decoy family has nothing to watch
    save_baseline(base, tmp_path)
    assert load_baseline(tmp_path, catalog_sha256=sha) == base
    with pytest.raises(CheckpointError, match="not the given"):
        load_baseline(tmp_path, catalog_sha256="f" * 64)


def test_robust_stats_on_a_hand_made_sample():
    s = robust_stats(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert (s.median, s.mad) == (3.0, 1.0)  # |x - 3| = 2, 1, 0, 1, 97
    assert s.sigma == pytest.approx(1.4826)
    assert robust_stats(np.ones(7)).sigma == SIGMA_FLOOR  # constant: MAD 0, floored


@pytest.mark.parametrize(
    ("k", "n", "exceeds", "fires"),
    [
        (2, 3, [1, 0, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0, 1, 1, 0]),
        (1, 1, [0, 1, 0], [0, 1, 0]),
        (3, 3, [1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]),
        (2, 4, [1, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]),  # 4 apart: never 2 in 4
    ],
)
def test_k_of_n_fires_exactly_when_it_should(k, n, exceeds, fires):
    rule = KOfN(k=k, n=n)
    assert [int(rule.push(bool(x))) for x in exceeds] == fires
