"""Least-squares starting point of a post-hoc fit: at every site, the encoder and the decoder
are set to the affine maps of least squared error between the two models' residuals.

Gradient descent on the NMSE terms alone would converge to exactly these maps (NMSE is a
squared error with a fixed denominator); starting there spends the fit's steps on the KL terms,
which least squares cannot see. Ridge-regularised so a residual channel that never varies (a
dead one in a weight-sparse model) cannot make the system singular.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.losses import residuals
from sparsecircuits.model.gpt import GPT


def affine_lstsq(x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-4):
    """The affine map ``y ≈ x @ W.T + b`` of least squared error: x (N, d_in), y (N, d_out)
    -> (W (d_out, d_in), b (d_out,)). ``ridge`` is relative to the mean variance of x."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xc.T @ yc).T
    return w, my - w @ mx


@torch.no_grad()
def init_lstsq(bridges: Bridges, sparse: GPT, dense: GPT, windows, *, tokens: int,
               seq_len: int, seed: int) -> None:  # fmt: skip
    """Set every site's encoder and decoder to the least-squares maps fitted on about
    ``tokens`` tokens of windows drawn (with their own seeded generator, so the fit's own
    window sequence is unchanged) from ``windows``."""
    rng = np.random.default_rng([seed, 1])
    n = max(1, -(-tokens // seq_len))
    dev = next(dense.parameters()).device
    hd: dict[str, list[torch.Tensor]] = {s: [] for s in bridges.sites}
    hs: dict[str, list[torch.Tensor]] = {s: [] for s in bridges.sites}
    chunk = max(1, 4096 // seq_len)  # windows per pass: about 4k tokens
    for lo in range(0, n, chunk):
        idx = torch.from_numpy(windows.sample_windows(rng, min(chunk, n - lo), seq_len)).long()
        _, d = residuals(dense, idx.to(dev), bridges.sites)
        _, s = residuals(sparse, idx.to(dev), bridges.sites)
        for site in bridges.sites:
            hd[site].append(d[site].reshape(-1, d[site].shape[-1]).cpu())
            hs[site].append(s[site].reshape(-1, s[site].shape[-1]).cpu())
    for site in bridges.sites:
        x, y = torch.cat(hd[site]), torch.cat(hs[site])
        b = bridges[site]
        for lin, (w, bias) in ((b.enc, affine_lstsq(x, y)), (b.dec, affine_lstsq(y, x))):
            lin.weight.copy_(w.to(lin.weight))
            lin.bias.copy_(bias.to(lin.bias))
