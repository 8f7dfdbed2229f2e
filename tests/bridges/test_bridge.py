"""Bridges on tiny models: the hybrid wiring (an identity bridge makes every hybrid pass the
plain model), NMSE and KL against hand computations, decoding a zero change, bad sites."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecircuits.bridges.bridge import Bridges, bridge_sites
from sparsecircuits.bridges.losses import hybrid_d2s, hybrid_s2d, kl, nmse, residuals
from sparsecircuits.errors import InputError
from tests.model.helpers import tiny_model, tokens


def test_sites_are_after_the_embedding_and_each_sublayer():
    assert bridge_sites(2) == ["0.resid_in", "0.resid_mid", "1.resid_in", "1.resid_mid",
                               "final_resid"]  # fmt: skip
    with pytest.raises(InputError, match="n_layer"):
        bridge_sites(0)


@pytest.mark.parametrize("direction", ["d2s", "s2d"])
def test_an_identity_bridge_makes_every_hybrid_pass_the_plain_model(direction):
    """Two copies of one model joined by identity bridges: crossing at any site changes
    nothing. A wrong site (one sublayer off) or a wrong model run after it would show."""
    m = tiny_model(0)
    other = tiny_model(1)  # a different model: crossing into it must change the logits
    idx = tokens()
    b = Bridges(n_layer=m.config.n_layer, d_dense=m.config.d_model, d_sparse=m.config.d_model)
    b.set_identity()
    with torch.no_grad():
        plain, res = residuals(m, idx, b.sites)
        for site in b.sites:
            run = hybrid_d2s if direction == "d2s" else hybrid_s2d
            assert torch.allclose(run(m, b, site, res[site], idx), plain, atol=1e-5), site
            if site != "final_resid":  # from another model's residual: other logits
                off = run(m, b, site, residuals(other, idx, b.sites)[1][site], idx)
                assert not torch.allclose(off, plain, atol=1e-3), site


def test_nmse_and_kl_against_hand_computations():
    target = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    pred = torch.tensor([[1.0, 3.0], [2.0, 6.0]])
    # errors: 0 + 1 + 1 + 0 = 2; deviations from the column means (2, 4): 1+4+1+4 = 10
    assert float(nmse(pred, target)) == pytest.approx(0.2)
    assert float(nmse(target, target)) == 0.0
    assert float(nmse(target.mean(0).expand_as(target), target)) == pytest.approx(1.0)
    p = torch.tensor([[math.log(0.5), math.log(0.5)]])
    q = torch.tensor([[math.log(0.25), math.log(0.75)]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl(p, q)) == pytest.approx(want, abs=1e-6)
    assert float(kl(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl(q, p)) != pytest.approx(want, abs=1e-3)  # not symmetric: the order counts


def test_decoding_a_zero_change_changes_nothing_and_is_linear():
    b = Bridges(n_layer=2, d_dense=12, d_sparse=20, k=4)
    zero = torch.zeros(3, 20)
    assert torch.equal(b.decode_delta("0.resid_mid", zero), torch.zeros(3, 12))
    d = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    h = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    site = b["0.resid_mid"]
    with torch.no_grad():
        assert torch.allclose(site.decode(h + d) - site.decode(h), b.decode_delta(1, d),
                              atol=1e-5)  # fmt: skip
        assert int((site.encode(torch.randn(5, 12)) != 0).sum(-1).max()) <= 4  # AbsTopK


def test_a_decoded_zero_change_added_to_the_dense_residual_leaves_its_logits():
    """The steering path: run the dense model from a site on its own residual plus the decoded
    change; a zero change gives the plain logits, a nonzero one does not."""
    d = tiny_model(1)
    b = Bridges(n_layer=d.config.n_layer, d_dense=d.config.d_model, d_sparse=20)
    idx = tokens()
    with torch.no_grad():
        plain, res = residuals(d, idx, b.sites)
        for site in ("0.resid_mid", "1.resid_in"):
            zero = b.decode_delta(site, torch.zeros(*idx.shape, 20))
            assert torch.allclose(d.forward_from(site, res[site] + zero, idx), plain, atol=1e-5)
            bump = b.decode_delta(site, torch.ones(*idx.shape, 20))
            assert not torch.allclose(d.forward_from(site, res[site] + bump, idx), plain)


def test_bad_sites_and_sizes_are_one_line():
    b = Bridges(n_layer=2, d_dense=8, d_sparse=8)
    with pytest.raises(InputError, match="not a bridge site") as err:
        b["2.resid_mid"]
    assert "\n" not in str(err.value) and "final_resid" in str(err.value)
    with pytest.raises(InputError, match="out of range"):
        b[5]
    with pytest.raises(InputError, match="keep-count"):
        Bridges(n_layer=1, d_dense=8, d_sparse=8, k=9)
    with pytest.raises(InputError, match="identity"):
        Bridges(n_layer=1, d_dense=8, d_sparse=6).set_identity()
