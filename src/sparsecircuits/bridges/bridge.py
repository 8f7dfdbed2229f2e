"""Bridges between a weight-sparse model and a dense one (Gao et al. 2025, section 6): at each
sublayer site an encoder maps the dense residual into the sparse model's residual and a decoder
maps it back, so a feature of a sparse circuit can be carried into the dense model.

Sites (2L + 1 for L layers, the same in both models): after the embedding (``0.resid_in``),
after each attention sublayer (``{l}.resid_mid``) and after each MLP sublayer
(``{l+1}.resid_in``, the last one ``final_resid``).

- encoder ``f_i(h_dense) = AbsTopK_k(W_enc h_dense + b_enc)``: (..., d_dense) -> (..., d_sparse);
  ``k`` the sparse model's own residual keep-count, or None (no AbsTopK) when its residual is
  dense;
- decoder ``g_i(h_sparse) = W_dec h_sparse + b_dec``: (..., d_sparse) -> (..., d_dense), linear,
  so a change ``dh`` of the sparse residual maps to ``W_dec dh`` (:meth:`Bridges.decode_delta`).

The fidelity terms of the training loss (NMSE and the hybrid KLs) live in
:mod:`sparsecircuits.bridges.losses`.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsecircuits.errors import InputError
from sparsecircuits.kernels.select import abstopk


def bridge_sites(n_layer: int) -> list[str]:
    """The 2 * n_layer + 1 residual sites a bridge pair connects, in forward order."""
    if n_layer < 1:
        raise InputError(f"n_layer must be >= 1, got {n_layer}")
    sites = ["0.resid_in"]
    for layer in range(n_layer):
        sites.append(f"{layer}.resid_mid")
        sites.append(f"{layer + 1}.resid_in" if layer + 1 < n_layer else "final_resid")
    return sites


class SiteBridge(nn.Module):
    """The encoder and decoder of one site."""

    def __init__(self, d_dense: int, d_sparse: int, *, k: int | None = None) -> None:
        super().__init__()
        if k is not None and not 1 <= k <= d_sparse:
            raise InputError(f"encoder keep-count k must be in [1, {d_sparse}], got {k}")
        self.k = k
        self.enc = nn.Linear(d_dense, d_sparse)
        self.dec = nn.Linear(d_sparse, d_dense)

    def encode(self, h_dense: torch.Tensor) -> torch.Tensor:
        """(..., d_dense) -> (..., d_sparse)."""
        z = self.enc(h_dense)
        return z if self.k is None else abstopk(z, self.k)

    def decode(self, h_sparse: torch.Tensor) -> torch.Tensor:
        """(..., d_sparse) -> (..., d_dense)."""
        return self.dec(h_sparse)


class Bridges(nn.Module):
    """One :class:`SiteBridge` per site of :func:`bridge_sites`."""

    def __init__(self, *, n_layer: int, d_dense: int, d_sparse: int, k: int | None = None) -> None:
        super().__init__()
        self.sites = bridge_sites(n_layer)
        self.n_layer, self.d_dense, self.d_sparse, self.k = n_layer, d_dense, d_sparse, k
        self.by_site = nn.ModuleList(SiteBridge(d_dense, d_sparse, k=k) for _ in self.sites)

    def site_index(self, site: str | int) -> int:
        """The index of ``site`` (a name or an index); one line naming the valid ones if not."""
        if isinstance(site, int):
            if not 0 <= site < len(self.sites):
                raise InputError(f"site {site} is out of range [0, {len(self.sites) - 1}]")
            return site
        if site not in self.sites:
            raise InputError(f"site {site!r}: not a bridge site (sites: {', '.join(self.sites)})")
        return self.sites.index(site)

    def __getitem__(self, site: str | int) -> SiteBridge:
        return self.by_site[self.site_index(site)]

    def decode_delta(self, site: str | int, delta_sparse: torch.Tensor) -> torch.Tensor:
        """A change of the sparse residual (..., d_sparse) carried into the dense residual:
        ``W_dec delta`` (the decoder's bias cancels in a difference)."""
        return delta_sparse @ self[site].dec.weight.T

    @torch.no_grad()
    def set_identity(self) -> Bridges:
        """Every encoder and decoder the identity (d_dense must equal d_sparse; no AbsTopK):
        a hybrid pass then equals the plain model (a test of the hybrid wiring)."""
        if self.d_dense != self.d_sparse or self.k is not None:
            raise InputError("an identity bridge needs d_dense == d_sparse and no encoder AbsTopK")
        eye = torch.eye(self.d_dense)
        for b in self.by_site:
            for lin in (b.enc, b.dec):
                lin.weight.copy_(eye)
                lin.bias.zero_()
        return self
