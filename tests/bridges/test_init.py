"""The least-squares starting point of a post-hoc fit: a planted affine map is recovered, and
at the start the NMSE terms are at their minimum (their gradient vanishes)."""

from __future__ import annotations

import pytest
import torch

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.init import affine_lstsq, init_lstsq
from sparsecircuits.bridges.losses import nmse, residuals
from tests.bridges.test_fit import Windows
from tests.model.helpers import tiny_model


def test_a_planted_affine_map_is_recovered():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    w, b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    got_w, got_b = affine_lstsq(x, x @ w.T + b, ridge=0.0)
    assert torch.allclose(got_w.float(), w, atol=1e-5) and torch.allclose(
        got_b.float(), b, atol=1e-5
    )


def test_a_dead_channel_does_not_make_it_singular():
    x = torch.randn(100, 5)
    x[:, 2] = 0.0  # a channel that never varies, as in a weight-sparse residual
    w, b = affine_lstsq(x, x[:, :3])
    assert torch.isfinite(w).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("part", ["enc", "dec"])
def test_the_nmse_terms_start_at_their_minimum(part):
    """On the tokens it was fitted on, the NMSE gradient at the start is ~0 (and it is far from
    0 for a random start): a site mixed up between models or directions would not be."""
    s, d = tiny_model(0), tiny_model(1)
    win = Windows(s.config.vocab_size)
    b = Bridges(n_layer=s.config.n_layer, d_dense=d.config.d_model, d_sparse=s.config.d_model)
    rand = {k: v.clone() for k, v in b.state_dict().items()}
    init_lstsq(b, s, d, win, tokens=512, seq_len=8, seed=0)
    import numpy as np

    rng = np.random.default_rng([0, 1])  # the same windows init_lstsq drew
    idx = torch.from_numpy(win.sample_windows(rng, 64, 8)).long()  # one pass of 512 tokens
    with torch.no_grad():
        _, hd = residuals(d, idx, b.sites)
        _, hs = residuals(s, idx, b.sites)

    def grad_norm() -> float:
        b.zero_grad()
        loss = sum(nmse(b[x].encode(hd[x]), hs[x]) if part == "enc"
                   else nmse(b[x].decode(hs[x]), hd[x]) for x in b.sites)  # fmt: skip
        loss.backward()
        return float(sum(p.grad.norm() ** 2 for p in b.parameters() if p.grad is not None) ** 0.5)

    at_init = grad_norm()
    b.load_state_dict(rand)
    assert at_init < 1e-3 * grad_norm()
