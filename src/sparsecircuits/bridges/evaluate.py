"""Bridge fidelity per site (``bridge eval``), on held-out token windows.

Per site: the encoder's and the decoder's NMSE (fraction of variance unexplained), the KL from
the dense model's next-token distribution to each hybrid's (nats per token), and each hybrid's
next-token agreement with the dense model (share of positions whose most likely token is the
same). Beside them, the sparse model alone against the dense one: a reference point, not a
bound (a bridge may do better or worse than it).
"""

from __future__ import annotations

from typing import Any

import torch

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.losses import hybrid_d2s, hybrid_s2d, kl, residuals
from sparsecircuits.model.gpt import GPT

FIDELITY_FILE = "fidelity.json"  # written by ``bridge eval`` beside the bridges


def agreement(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Share of positions where both logits (..., vocab) rank the same token first."""
    return float((p_logits.argmax(-1) == q_logits.argmax(-1)).float().mean())


class _Pooled:
    """NMSE pooled over every evaluated token: squared errors and the target's spread around
    the mean of *all* tokens (float64 sums), so the figure does not depend on the batching."""

    def __init__(self) -> None:
        self.err = self.sq = 0.0
        self.sum: torch.Tensor | None = None
        self.n = 0

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        t = target.reshape(-1, target.shape[-1]).double()
        self.err += float((pred.reshape(t.shape).double() - t).pow(2).sum())
        self.sq += float(t.pow(2).sum())
        self.sum = t.sum(0) if self.sum is None else self.sum + t.sum(0)
        self.n += len(t)

    def value(self) -> float:
        spread = self.sq - float(self.sum.pow(2).sum()) / self.n  # sum |t - mean|^2
        return self.err / max(spread, 1e-300)


@torch.no_grad()
def fidelity(sparse: GPT, dense: GPT, bridges: Bridges, windows: torch.Tensor, *,
             batch: int = 8) -> dict[str, Any]:  # fmt: skip
    """``windows`` (N, T) int64. Returns {"sites": [per-site dict], "sparse_alone": dict}:
    NMSE pooled over all tokens (:func:`losses.nmse`'s definition on the whole set), KL and
    agreement averaged over tokens."""
    keys = ("kl_d2s", "kl_s2d", "agree_d2s", "agree_s2d")
    sums = {s: dict.fromkeys(keys, 0.0) for s in bridges.sites}
    pooled = {s: (_Pooled(), _Pooled()) for s in bridges.sites}
    alone = {"kl": 0.0, "agree": 0.0}
    for lo in range(0, len(windows), batch):
        idx = windows[lo : lo + batch]
        w = len(idx) / len(windows)  # equal-length windows: a batch weighs by its share
        dl, hd = residuals(dense, idx, bridges.sites)
        sl, hs = residuals(sparse, idx, bridges.sites)
        alone["kl"] += w * float(kl(dl, sl))
        alone["agree"] += w * agreement(dl, sl)
        for site in bridges.sites:
            b, acc = bridges[site], sums[site]
            d2s = hybrid_d2s(sparse, bridges, site, hd[site], idx)
            s2d = hybrid_s2d(dense, bridges, site, hs[site], idx)
            pooled[site][0].add(b.encode(hd[site]), hs[site])
            pooled[site][1].add(b.decode(hs[site]), hd[site])
            acc["kl_d2s"] += w * float(kl(dl, d2s))
            acc["kl_s2d"] += w * float(kl(dl, s2d))
            acc["agree_d2s"] += w * agreement(dl, d2s)
            acc["agree_s2d"] += w * agreement(dl, s2d)
    rows = [{"site": s, "enc_nmse": pooled[s][0].value(), "dec_nmse": pooled[s][1].value(),
             **sums[s]} for s in bridges.sites]  # fmt: skip
    return {"windows": len(windows), "seq_len": int(windows.shape[1]), "sites": rows,
            "sparse_alone": alone}  # fmt: skip


def format_table(doc: dict[str, Any]) -> str:
    """The fidelity table as text: one row per site, then the sparse model alone."""
    head = (f"{'site':<14}{'enc NMSE':>10}{'dec NMSE':>10}{'KL d->s':>10}{'KL s->d':>10}"
            f"{'agree d->s':>12}{'agree s->d':>12}")  # fmt: skip
    rows = [head]
    for r in doc["sites"]:
        rows.append(f"{r['site']:<14}{r['enc_nmse']:>10.3f}{r['dec_nmse']:>10.3f}"
                    f"{r['kl_d2s']:>10.3f}{r['kl_s2d']:>10.3f}{r['agree_d2s']:>12.1%}"
                    f"{r['agree_s2d']:>12.1%}")  # fmt: skip
    a = doc["sparse_alone"]
    rows.append(f"{'sparse alone':<14}{'':>10}{'':>10}{a['kl']:>10.3f}{'':>10}"
                f"{a['agree']:>12.1%}")  # fmt: skip
    return "\n".join(rows)
