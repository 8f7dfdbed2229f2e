"""The bridge fidelity terms, each in one place: NMSE of the encoder and decoder at every site,
and the hybrid KLs (the dense model's next-token distribution against a pass that crosses from
one model into the other at a site).

- ``nmse(pred, target)``: the fraction of variance unexplained, sum of squared errors over the
  sum of squared deviations of ``target`` from its mean over the batch's tokens; the
  denominator is detached (the target's spread is not something to train).
- ``kl(p_logits, q_logits)``: KL(p || q) of next-token distributions, nats per token, averaged
  over tokens.
- ``hybrid_d2s``: the dense model up to site i, the encoder, the sparse model from i on.
- ``hybrid_s2d``: the sparse model up to site i, the decoder, the dense model from i on.
- ``stacked_pass``, ``hybrids_d2s``, ``hybrids_s2d``: every site's hybrid at once, in one
  forward pass on the batch stacked once per site (the same logits as the per-site functions,
  up to float rounding).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks


def nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained of ``pred`` for ``target`` (..., d): a scalar; 0 is
    perfect, 1 is as good as predicting the batch mean."""
    t = target.reshape(-1, target.shape[-1]).float()
    err = (pred.reshape(t.shape).float() - t).pow(2).sum()
    spread = (t - t.mean(0, keepdim=True)).pow(2).sum().detach()
    return err / spread.clamp_min(torch.finfo(torch.float32).tiny)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats per token, averaged over tokens, of logits (..., vocab)."""
    lp = F.log_softmax(p_logits.float(), -1)
    lq = F.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def residuals(model: GPT, idx: torch.Tensor, sites: list[str]) -> tuple[torch.Tensor, dict]:
    """(logits (B, T, vocab), {site: residual (B, T, d_model)}) of one plain pass; the
    residuals keep their graph (gradients flow through them)."""
    hooks = Hooks(cache_names=sites, detach=False)
    logits, _ = model(idx, hooks=hooks)
    return logits, dict(hooks.cache)


def hybrid_d2s(sparse: GPT, bridges: Bridges, site: str, h_dense: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Logits (B, T, vocab) of the sparse model run from ``site`` on the encoded dense
    residual ``h_dense`` (B, T, d_dense) there."""
    return sparse.forward_from(site, bridges[site].encode(h_dense), idx)


def hybrid_s2d(dense: GPT, bridges: Bridges, site: str, h_sparse: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Logits (B, T, vocab) of the dense model run from ``site`` on the decoded sparse
    residual ``h_sparse`` (B, T, d_sparse) there."""
    return dense.forward_from(site, bridges[site].decode(h_sparse), idx)


def stacked_pass(model: GPT, idx: torch.Tensor, inject: Mapping[str, torch.Tensor], *,
                 plain: Collection[str] | None = None) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """One forward of ``model`` on ``idx`` (B, T) stacked ``n`` deep, ``n = len(inject)`` (+1
    with ``plain``): copy j has its residual at the j-th site of ``inject`` replaced by
    ``inject[site]`` (B, T, d_model), which is ``model.forward_from(site, inject[site], idx)``;
    with ``plain`` the last copy runs untouched and its residuals at the sites in ``plain`` are
    returned (graph kept).

    Returns (logits (n, B, T, vocab), {site: residual (B, T, d_model)}). The copies of a
    sequence are adjacent rows (row b * n + j), so any leading share of the rows holds every
    copy: the fast trainer's regrowth estimate reads the first sequences of a pass."""
    B, n = idx.shape[0], len(inject) + (plain is not None)

    def put(j: int, h: torch.Tensor):
        def fn(x: torch.Tensor) -> torch.Tensor:  # x (B * n, T, d_model)
            # copy j before the site was computed for nothing: the copy is overwritten here
            out = x.clone(memory_format=torch.contiguous_format)
            out.view(B, n, *x.shape[1:])[:, j] = h
            return out

        return fn

    put_all = {s: put(j, h) for j, (s, h) in enumerate(inject.items())}
    hooks = Hooks(cache_names=plain, interventions=put_all, detach=False)
    logits, _ = model(idx.repeat_interleave(n, dim=0), hooks=hooks)
    cached = {s: h.unflatten(0, (B, n))[:, -1] for s, h in hooks.cache.items()}
    return logits.unflatten(0, (B, n)).movedim(1, 0), cached


def hybrids_d2s(sparse: GPT, bridges: Bridges, h_dense: Mapping[str, torch.Tensor],
                idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """:func:`hybrid_d2s` at every bridge site in one pass: logits (n_sites, B, T, vocab)
    from the dense residuals ``h_dense`` {site: (B, T, d_dense)}."""
    enc = {s: bridges[s].encode(h_dense[s]) for s in bridges.sites}
    return stacked_pass(sparse, idx, enc)[0]


def hybrids_s2d(dense: GPT, bridges: Bridges, h_sparse: Mapping[str, torch.Tensor],
                idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """:func:`hybrid_s2d` at every bridge site in one pass: logits (n_sites, B, T, vocab)
    from the sparse residuals ``h_sparse`` {site: (B, T, d_sparse)}."""
    dec = {s: bridges[s].decode(h_sparse[s]) for s in bridges.sites}
    return stacked_pass(dense, idx, dec)[0]
