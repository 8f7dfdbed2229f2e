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


class _Moments:
    """Sufficient statistics of an affine least-squares fit, accumulated in float64 so memory
    does not grow with the token count: sums of x and y, x^T x and x^T y."""

    def __init__(self) -> None:
        self.n, self.sx, self.sy, self.xx, self.xy = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.n += len(x)
        self.sx, self.sy = self.sx + x.sum(0), self.sy + y.sum(0)
        self.xx, self.xy = self.xx + x.T @ x, self.xy + x.T @ y

    def solve(self, *, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (d_out, d_in), b (d_out,)) of ``y ≈ x @ W.T + b``; ``ridge`` is relative to the
        mean variance of x."""
        mx, my = self.sx / self.n, self.sy / self.n
        gram = self.xx - self.n * torch.outer(mx, mx)  # centred x^T x
        cross = self.xy - self.n * torch.outer(mx, my)
        lam = ridge * float(gram.diagonal().mean()) + 1e-12
        w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), cross).T
        return w, my - w @ mx


def affine_lstsq(x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-4):
    """The affine map ``y ≈ x @ W.T + b`` of least squared error: x (N, d_in), y (N, d_out)
    -> (W (d_out, d_in), b (d_out,)). ``ridge`` is relative to the mean variance of x."""
    m = _Moments()
    m.add(x, y)
    return m.solve(ridge=ridge)


@torch.no_grad()
def init_lstsq(bridges: Bridges, sparse: GPT, dense: GPT, windows, *, tokens: int,
               seq_len: int, seed: int) -> None:  # fmt: skip
    """Set every site's encoder and decoder to the least-squares maps fitted on about
    ``tokens`` tokens of windows drawn (with their own seeded generator, so the fit's own
    window sequence is unchanged) from ``windows``. Memory is the statistics' only, whatever
    the token count. With an encoder AbsTopK (``k``) this is a starting point, not the NMSE
    optimum."""
    rng = np.random.default_rng([seed, 1])
    n = max(1, -(-tokens // seq_len))
    dev = next(dense.parameters()).device
    enc = {s: _Moments() for s in bridges.sites}  # dense -> sparse
    dec = {s: _Moments() for s in bridges.sites}  # sparse -> dense
    chunk = max(1, 4096 // seq_len)  # windows per pass: about 4k tokens
    for lo in range(0, n, chunk):
        idx = torch.from_numpy(windows.sample_windows(rng, min(chunk, n - lo), seq_len)).long()
        _, d = residuals(dense, idx.to(dev), bridges.sites)
        _, s = residuals(sparse, idx.to(dev), bridges.sites)
        for site in bridges.sites:
            x = d[site].reshape(-1, d[site].shape[-1]).cpu()
            y = s[site].reshape(-1, s[site].shape[-1]).cpu()
            enc[site].add(x, y)
            dec[site].add(y, x)
    for site in bridges.sites:
        b = bridges[site]
        for lin, m in ((b.enc, enc[site]), (b.dec, dec[site])):
            w, bias = m.solve()
            lin.weight.copy_(w.to(lin.weight))
            lin.bias.copy_(bias.to(lin.bias))
