"""Per-token scores of a circuit family: engagement (cheap, every token) and causal share
(opt-in, a second forward pass).

**Engagement** of family f at token t::

    e_f(t) = (1 / |N_f|) * sum_{n in N_f} |a_n(t)| / s_n

where N_f is the union of the nodes of f's admitted circuits (token-embedding nodes left out:
they are token identities, not activations), a_n(t) is node n's activation at t (at its hook
site, after AbsTopK, as circuits are masked), and s_n is n's mean |activation| over benign text
(stdlib held-out windows, measured when the catalogue is built), floored at
``SCALE_FLOOR_FRACTION`` of its site's mean channel scale and at ``SCALE_FLOOR_ABS`` so a node
that is almost never active cannot divide by ~0. Engagement is dimensionless: 1 means the
family's nodes are, on average, as active as on benign text. Cost: one gather of the family's
channels per site per pass.

**Causal share** at a position: the change in the emitted token's log-probability and in each of
the family's tasks' answer logit difference (``logit(answer A) - logit(answer B)``) when exactly
the family's nodes are mean-ablated (``circuits.masking`` interventions, the pretraining means
stored in the catalogue). It re-runs the whole prefix twice without the KV cache (the
generation's cache holds unablated keys and values, so it cannot be reused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sparsecircuits.circuits.masking import Ablation, mask_interventions
from sparsecircuits.circuits.nodes import SITE, Location, NodeSpace
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks, Intervention

SCALE_FLOOR_FRACTION = 0.01  # of the site's mean channel scale
SCALE_FLOOR_ABS = 1e-6  # activation units
_LOC_OF_SITE = {v: k for k, v in SITE.items()}


def site_location(site: str) -> tuple[int, Location]:
    """``"1.mlp.post_act"`` -> (1, Location.MLP_NEURON)."""
    layer, _, rel = site.partition(".")
    return int(layer), _LOC_OF_SITE[rel]


@dataclass(frozen=True)
class FamilyNodes:
    """A family's nodes, grouped by hook site. Per site: channel ``index`` (k,) int64, benign
    scale ``scale`` (k,) float32 (activation units) and pretraining mean ``mean`` (k,)."""

    name: str
    index: Mapping[str, torch.Tensor]
    scale: Mapping[str, torch.Tensor]
    mean: Mapping[str, torch.Tensor]

    @property
    def sites(self) -> list[str]:
        return list(self.index)

    @property
    def n_nodes(self) -> int:
        return sum(len(i) for i in self.index.values())

    def to(self, device: torch.device | str) -> FamilyNodes:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return FamilyNodes(self.name, move(self.index), move(self.scale), move(self.mean))


def engagement(cache: Mapping[str, torch.Tensor], fam: FamilyNodes) -> torch.Tensor:
    """Engagement of ``fam`` at each position: ``cache[site]`` (B, T, width) -> (B, T) float32
    (dimensionless; see the module docstring). Sites must all be in ``cache``."""
    total: torch.Tensor | None = None
    for site, idx in fam.index.items():
        a = cache[site].index_select(-1, idx).float().abs()  # (B, T, k): one gather per site
        part = (a / fam.scale[site]).sum(-1)
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"family {fam.name!r} has no nodes")
    return total / fam.n_nodes


class FamilyScorer:
    """Engagement of several families at once, for the per-token path of serving: per site one
    gather of the union of the families' channels, then one product with a (F, N) matrix that
    averages each family's normalised activations. Equals :func:`engagement` per family (a
    node's benign scale is the node's, so families sharing a node share its scale)."""

    def __init__(self, families: Mapping[str, FamilyNodes]) -> None:
        self.names = list(families)
        self.sites = sorted({s for f in families.values() for s in f.sites})
        self.index: dict[str, torch.Tensor] = {}
        inv: list[torch.Tensor] = []
        rows: list[list[tuple[int, float]]] = [[] for _ in self.names]
        offset = 0
        for site in self.sites:
            chans: dict[int, float] = {}
            for fam in families.values():
                if site in fam.index:
                    for c, sc in zip(fam.index[site].tolist(), fam.scale[site].tolist(),
                                     strict=True):  # fmt: skip
                        chans[c] = sc
            order = sorted(chans)
            pos = {c: offset + j for j, c in enumerate(order)}
            self.index[site] = torch.tensor(order, dtype=torch.long)
            inv.append(1.0 / torch.tensor([chans[c] for c in order], dtype=torch.float32))
            for f, fam in enumerate(families.values()):
                if site in fam.index:
                    rows[f] += [(pos[c], 1.0 / fam.n_nodes) for c in fam.index[site].tolist()]
            offset += len(order)
        self.inv_scale = torch.cat(inv) if inv else torch.zeros(0)
        self.weight = torch.zeros(len(self.names), offset)  # (F, N)
        for f, entries in enumerate(rows):
            for col, w in entries:
                self.weight[f, col] = w

    def to(self, device: torch.device | str) -> FamilyScorer:
        self.index = {k: v.to(device) for k, v in self.index.items()}
        self.inv_scale, self.weight = self.inv_scale.to(device), self.weight.to(device)
        return self

    def __call__(self, cache: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``cache[site]`` (B, T, width) -> engagement (B, T, F) float32, families in
        ``names`` order."""
        parts = [cache[s].index_select(-1, self.index[s]) for s in self.sites]
        a = torch.cat(parts, dim=-1).float().abs() * self.inv_scale  # (B, T, N)
        return a @ self.weight.T


@torch.no_grad()
def benign_scales(
    model: GPT, windows: torch.Tensor, nodes: Mapping[str, Sequence[int]], *, batch: int = 8
) -> dict[str, torch.Tensor]:
    """Floored mean |activation| of each node over every position of ``windows`` (N, T) int64:
    ``{site: (k,) float32}`` in ``nodes[site]``'s order (floors: see the module docstring)."""
    dev = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in range(0, windows.shape[0], batch):
        hooks = Hooks(cache_names=list(nodes))
        model(windows[start : start + batch].to(dev), hooks=hooks)
        for site in nodes:
            s = hooks.cache[site].float().abs().flatten(0, 1).sum(0)  # (width,)
            sums[site] = sums.get(site, 0) + s
        count += windows[start : start + batch].numel()
    out = {}
    for site, idx in nodes.items():
        per_channel = sums[site].cpu() / count  # (width,)
        floor = max(SCALE_FLOOR_FRACTION * float(per_channel.mean()), SCALE_FLOOR_ABS)
        out[site] = per_channel[torch.as_tensor(list(idx), dtype=torch.long)].clamp_min(floor)
    return out


def dampen_interventions(
    fam: FamilyNodes, *, mode: str, factor: float = 0.0
) -> dict[str, Intervention]:
    """Interventions that change exactly ``fam``'s channels, every position: ``mode="scale"``
    multiplies them by ``factor``; ``mode="mean_ablate"`` replaces them by their pretraining
    means. Other channels pass through unchanged (a copy is returned, the input is not
    modified)."""
    if mode not in ("scale", "mean_ablate"):
        raise ValueError(f"unknown dampen mode {mode!r}")
    out: dict[str, Intervention] = {}
    for site, idx in fam.index.items():
        mu = fam.mean[site]

        def fn(x: torch.Tensor, idx: torch.Tensor = idx, mu: torch.Tensor = mu) -> torch.Tensor:
            y = x.clone()
            i, m = idx.to(x.device), mu.to(x.device, x.dtype)
            y[..., i] = x[..., i] * factor if mode == "scale" else m.expand_as(x[..., i])
            return y

        out[site] = fn
    return out


def chain(fns: Mapping[str, Intervention], more: Mapping[str, Intervention]) -> dict:
    """``fns`` then ``more`` at each site (two dampened families may share a site)."""
    out = dict(fns)
    for site, g in more.items():
        f = out.get(site)
        out[site] = g if f is None else (lambda x, f=f, g=g: g(f(x)))
    return out


def family_ablation(model: GPT, fam: FamilyNodes) -> tuple[NodeSpace, torch.Tensor, Ablation]:
    """The family as ``circuits.masking`` inputs: node space, gates (0 on the family's nodes,
    1 elsewhere) and mean-ablation values (the catalogue's means at those nodes)."""
    space = NodeSpace(model.config)
    gates = torch.ones(space.total)
    values: dict[str, torch.Tensor] = {}
    for site, idx in fam.index.items():
        layer, loc = site_location(site)
        g = space.group(layer, loc)
        gates[g.offset + idx.cpu()] = 0.0
        v = torch.zeros(g.size)
        v[idx.cpu()] = fam.mean[site].cpu().float()
        values[g.key] = v
    return space, gates, Ablation("mean", values)


def ablated_hooks(model: GPT, fam: FamilyNodes, idx: torch.Tensor) -> Hooks:
    """Hooks that mean-ablate exactly ``fam``'s nodes on a pass over ``idx`` (B, T)."""
    space, gates, ablation = family_ablation(model, fam)
    dev = idx.device
    fns = mask_interventions(model, space, gates.to(dev), ablation.to(dev), idx=idx,
                             skip_full=True)  # fmt: skip
    return Hooks(interventions=fns)


def logprob_change(full: torch.Tensor, ablated: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The causal share's core, in one place: log p(token) under ``full`` logits minus under
    ``ablated`` logits (..., vocab), per token id ``tokens`` (...); nats, > 0 where the family
    supported the token."""
    lp_full = torch.log_softmax(full.float(), -1).gather(-1, tokens[..., None])[..., 0]
    lp_abl = torch.log_softmax(ablated.float(), -1).gather(-1, tokens[..., None])[..., 0]
    return lp_full - lp_abl


@torch.no_grad()
def causal_share(
    model: GPT,
    prefix: torch.Tensor,
    emitted: int,
    fam: FamilyNodes,
    *,
    answers: Mapping[str, tuple[int, int]],
) -> dict[str, object]:
    """Mean-ablate exactly ``fam``'s nodes and re-run ``prefix`` (1, T) int64 (no KV cache).

    Returns, at the last position: ``logprob_change`` = log p(emitted) full minus ablated
    (nats; > 0: the family supported the emitted token) and ``logit_diff_change`` per task
    (full minus ablated ``logit(a) - logit(b)`` for the task's answer tokens ``answers[task]``).
    """
    idx = prefix.to(next(model.parameters()).device)
    full = model(idx)[0][0, -1].float()
    abl = model(idx, hooks=ablated_hooks(model, fam, idx))[0][0, -1].float()
    diffs = {
        task: float((full[a] - full[b]) - (abl[a] - abl[b])) for task, (a, b) in answers.items()
    }
    return {
        "family": fam.name,
        "emitted": emitted,
        "logprob_change": float(logprob_change(full, abl, torch.tensor(emitted))),
        "logit_diff_change": diffs,
    }
