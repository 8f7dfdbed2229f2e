"""Steering a dense model through a sparse circuit node and its bridge (paper section 6).

A node ``L.loc.index`` of the sparse model is moved from its class-A value to its class-B value
(means over a task's A and B prompts, at the steered positions), the change is carried to the
next residual site of the sparse model by running it (for a residual write this is the node's
own channel; any other node reaches the residual through its sublayer), and ``W_dec`` carries
that residual change into the dense model at the same site. Measured on held-out prompts of
the *from* class: the change of the dense model's task logit difference and the share of
prompts whose choice flips to the other class's answer.

Controls, at the same scale: a random dense direction of equal norm (per seed, the norm matched
prompt by prompt), the dense model's own class-mean difference at that site (an upper
reference), and the same node steered in the sparse model itself. Side effects: the dense
model's accuracy on the other tasks and its held-out loss with the steering applied.

Positions: ``last`` steers each prompt's last position (where the task's choice is made: the
class values are means at that position); ``all`` steers every position (class values are
means over all positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.circuits.nodes import Location, Node, NodeSpace
from sparsecircuits.errors import InputError
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import FINAL_SITE, Hooks
from sparsecircuits.tasks.batch import TaskBatch
from sparsecircuits.tasks.metrics import pad_prompts

Positions = Literal["last", "all"]
Side = Literal["a", "b"]


def parse_node(text: str, sparse: GPT) -> Node:
    """``L.loc.index`` (e.g. ``0.attn_out.220``) -> a node that exists in ``sparse``; one line
    naming what is wrong otherwise."""
    parts = text.strip().split(".")
    locs = ", ".join(loc.value for loc in Location if loc is not Location.EMBED)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
        raise InputError(f"--node {text!r}: expected LAYER.LOCATION.INDEX, e.g. 0.attn_out.220")
    layer, index = int(parts[0]), int(parts[2])
    if parts[1] not in locs.split(", "):
        raise InputError(f"--node {text!r}: location {parts[1]!r} is not one of {locs}")
    if layer >= sparse.config.n_layer:
        raise InputError(f"--node {text!r}: the model has layers 0..{sparse.config.n_layer - 1}")
    node = Node(layer, Location(parts[1]), index)
    try:
        NodeSpace(sparse.config).flat_index(node)
    except InputError as err:
        raise InputError(f"--node {text!r}: {err}") from None
    return node


def node_id(node: Node) -> str:
    """``L.loc.index``, the form :func:`parse_node` reads."""
    return f"{node.layer}.{node.loc.value}.{node.index}"


def next_site(node: Node, n_layer: int) -> str:
    """The residual site right after the node's sublayer (attention: ``L.resid_mid``; MLP:
    ``L+1.resid_in``, or ``final_resid`` after the last layer)."""
    if node.loc.value.startswith("attn"):
        return f"{node.layer}.resid_mid"
    return f"{node.layer + 1}.resid_in" if node.layer + 1 < n_layer else FINAL_SITE


@dataclass(frozen=True)
class Prompts:
    """Right-padded prompts: ``idx`` (N, T) int64, ``mask`` (N, T) bool of steered positions,
    ``last`` (N,) the last real position of each row."""

    idx: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor

    @classmethod
    def of(cls, prompts: list[list[int]], positions: Positions, device) -> Prompts:
        idx, lengths = pad_prompts(prompts)
        last = lengths - 1
        cols = torch.arange(idx.shape[1])
        if positions == "last":
            mask = cols[None, :] == last[:, None]
        else:
            mask = cols[None, :] <= last[:, None]
        return cls(idx.to(device), mask.to(device), last.to(device))

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, ...) -> (N, ...) at each row's last real position."""
        return x[torch.arange(len(x), device=x.device), self.last]


def _add_at(mask: torch.Tensor, delta: torch.Tensor, channel: int | None = None):
    """An intervention adding ``delta`` at the masked positions: (N, T, d) per position, or a
    scalar at one ``channel``."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        if channel is None:
            x[mask] += delta[mask].to(x.dtype)
        else:
            x[..., channel][mask] += delta
        return x

    return fn


@torch.no_grad()
def node_mean(sparse: GPT, node: Node, p: Prompts) -> float:
    """The node's mean value over the masked positions of prompts ``p``."""
    hooks = Hooks(cache_names=[node.site])
    sparse(p.idx, hooks=hooks)
    return float(hooks.cache[node.site][..., node.index][p.mask].float().mean())


@torch.no_grad()
def site_mean(model: GPT, site: str, p: Prompts) -> torch.Tensor:
    """The residual at ``site`` averaged over the masked positions: (d_model,)."""
    hooks = Hooks(cache_names=[site])
    model(p.idx, hooks=hooks)
    return hooks.cache[site][p.mask].float().mean(0)


@torch.no_grad()
def sparse_delta(sparse: GPT, node: Node, amount: float, site: str, p: Prompts) -> torch.Tensor:
    """The change (N, T, d_sparse) of the sparse residual at ``site`` when ``amount`` is added
    to the node at the masked positions, measured by running the model (a residual write is
    its own channel's change unless the residual is activated after it; a residual read or
    any other node is carried through its sublayer)."""
    # Always measured by running: a residual write reaches the residual as is only when the
    # residual is not ReLU'd or AbsTopK'd after it (the shipped models), and running gives that
    # exact answer there too.
    plain, steered = (
        Hooks(cache_names=[site]),
        Hooks(cache_names=[site], interventions={node.site: _add_at(p.mask, amount, node.index)}),
    )
    sparse(p.idx, hooks=plain)
    sparse(p.idx, hooks=steered)
    return (steered.cache[site] - plain.cache[site]).float()


@torch.no_grad()
def final_logits_with(model: GPT, p: Prompts, site: str | None = None,
                      delta: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Logits (N, vocab) at each prompt's last position, with ``delta`` (N, T, d) added to the
    residual at ``site`` on the masked positions (none: the plain model)."""
    hooks = None
    if site is not None and delta is not None:
        hooks = Hooks(interventions={site: _add_at(p.mask, delta)})
    logits, _ = model(p.idx, hooks=hooks)
    return p.final(logits)


def flips(before: torch.Tensor, after: torch.Tensor) -> dict[str, float | int]:
    """Logit differences (N,) of the *from* class's answer over the other's, before and after:
    the share of prompts choosing the from-answer before that choose the other after, and the
    mean change of the difference (negative: toward the other class)."""
    chose = before > 0
    n = int(chose.sum())
    flipped = float(((after <= 0) & chose).sum()) / n if n else float("nan")
    return {"n": n, "flip": flipped, "dlogit": float((after - before).mean())}


def random_like(delta: torch.Tensor, *, seed: int) -> torch.Tensor:
    """One random direction (seeded) scaled, position by position, to ``delta``'s norm:
    (N, T, d) -> (N, T, d)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(delta.shape[-1], generator=g).to(delta)
    return F.normalize(u, dim=0) * delta.norm(dim=-1, keepdim=True)


def side_tensors(
    batch: TaskBatch, side: Side
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """(prompts, the side's answer, the other answer) of one side of a task batch."""
    if side == "a":
        return batch.prompts_a, batch.target_a, batch.other_a
    return batch.prompts_b, batch.target_b, batch.other_b


@dataclass(frozen=True)
class Steering:
    """A node move, its site and the class means it was derived from (train prompts)."""

    node: Node
    site: str
    value_from: float
    value_to: float
    dense_from: torch.Tensor  # (d_dense,) the dense residual's class mean at ``site``
    dense_to: torch.Tensor
    positions: Positions

    def amount(self, scale: float) -> float:
        return scale * (self.value_to - self.value_from)


def derive(sparse: GPT, dense: GPT, node: Node, train: TaskBatch, *, src: Side, dst: Side,
           positions: Positions) -> Steering:  # fmt: skip
    """Class means of the node (sparse) and of the dense residual at the node's next site, on
    the train prompts of each side."""
    dev = next(sparse.parameters()).device
    site = next_site(node, sparse.config.n_layer)
    p_src = Prompts.of(side_tensors(train, src)[0], positions, dev)
    p_dst = Prompts.of(side_tensors(train, dst)[0], positions, dev)
    return Steering(
        node=node, site=site, positions=positions,
        value_from=node_mean(sparse, node, p_src), value_to=node_mean(sparse, node, p_dst),
        dense_from=site_mean(dense, site, p_src), dense_to=site_mean(dense, site, p_dst),
    )  # fmt: skip


@torch.no_grad()
def dense_delta(steer: Steering, sparse: GPT, bridges: Bridges, p: Prompts,
                scale: float) -> torch.Tensor:  # fmt: skip
    """The bridged change of the dense residual (N, T, d_dense) at the steering's site."""
    ds = sparse_delta(sparse, steer.node, steer.amount(scale), steer.site, p)
    return bridges.decode_delta(steer.site, ds)


def check_sides(src: str, dst: str) -> None:
    if src not in ("a", "b") or dst not in ("a", "b") or src == dst:
        raise InputError(f"--from {src!r} --to {dst!r}: expected the two sides a and b")


@torch.no_grad()
def rank_nodes(sparse: GPT, nodes: list[Node], train: TaskBatch, *, positions: Positions,
               top: int = 10) -> list[dict]:  # fmt: skip
    """Nodes ordered by how well they separate the task's two classes: |mean_b - mean_a| over
    the pooled standard deviation, at the steered positions of the train prompts."""
    dev = next(sparse.parameters()).device
    sites = sorted({n.site for n in nodes})
    vals = {}
    for side in ("a", "b"):
        p = Prompts.of(side_tensors(train, side)[0], positions, dev)
        hooks = Hooks(cache_names=sites)
        sparse(p.idx, hooks=hooks)
        vals[side] = {s: hooks.cache[s][p.mask].float() for s in sites}  # (M, width)
    rows = []
    for n in nodes:
        a, b = vals["a"][n.site][:, n.index], vals["b"][n.site][:, n.index]
        sd = float(torch.cat([a - a.mean(), b - b.mean()]).std())
        gap = float(b.mean() - a.mean())
        rows.append({"node": node_id(n), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
                     "separation": abs(gap) / max(sd, 1e-12)})  # fmt: skip
    return sorted(rows, key=lambda r: -r["separation"])[:top]
