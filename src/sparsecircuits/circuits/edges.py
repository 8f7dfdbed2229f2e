"""Circuit edges: every nonzero weight whose two endpoint nodes are both kept, plus the
residual-stream links from a kept write channel to a later kept read of the same channel.

Kinds (per layer L):

============== ======================== =========================================
kind           weight                   endpoints
============== ======================== =========================================
``read_q``     ``attn.c_attn`` (q rows) ``L.attn_in[r]`` -> ``L.attn_q[j]``
``read_k``     ``attn.c_attn`` (k rows) ``L.attn_in[r]`` -> ``L.attn_k[j]``
``read_v``     ``attn.c_attn`` (v rows) ``L.attn_in[r]`` -> ``L.attn_v[j]``
``v_write``    ``attn.c_proj``          ``L.attn_v[j]`` -> ``L.attn_out[i]`` (via the head's mix)
``read_neuron`` ``mlp.c_fc``            ``L.mlp_in[r]`` -> ``L.mlp_neuron[j]``
``neuron_write`` ``mlp.c_proj``         ``L.mlp_neuron[j]`` -> ``L.mlp_out[i]``
``residual``   identity (weight 1)      a write ``c`` -> every later read ``c``
``embed``      ``wte`` (token mask on)  ``embed[t]`` -> every read ``c`` with wte[t, c] != 0
============== ======================== =========================================

The paper counts nonzero weights; ``residual`` links are not weights, so :func:`count_by_kind`
lets a caller report both (``n_weight_edges`` in the circuit file).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from sparsecircuits.circuits.nodes import READS, WRITES, Location, Node, NodeSpace
from sparsecircuits.model.gpt import GPT

WEIGHT_KINDS = ("read_q", "read_k", "read_v", "v_write", "read_neuron", "neuron_write", "embed")
KINDS = (*WEIGHT_KINDS, "residual")


@dataclass(frozen=True)
class Edge:
    src: Node
    dst: Node
    kind: str
    weight: float


def kept_by_group(space: NodeSpace, kept: torch.Tensor) -> dict[tuple[int, Location], torch.Tensor]:
    """{(layer, loc): sorted channel indices kept there} for every group (possibly empty)."""
    kept = torch.as_tensor(kept, dtype=torch.long).sort().values
    out = {}
    for g in space.groups:
        sel = kept[(kept >= g.offset) & (kept < g.offset + g.size)] - g.offset
        out[(g.layer, g.loc)] = sel
    return out


def _pairs(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> list[tuple[int, int, float]]:
    """(row, col, value) of the nonzeros of ``w[rows][:, cols]`` in original indices."""
    if rows.numel() == 0 or cols.numel() == 0:
        return []
    sub = w.index_select(0, rows).index_select(1, cols)
    nz = sub.nonzero()
    return [(int(rows[i]), int(cols[j]), float(sub[i, j])) for i, j in nz.tolist()]


@torch.no_grad()
def circuit_edges(model: GPT, space: NodeSpace, kept: torch.Tensor) -> list[Edge]:
    """Every edge between kept nodes (see the module docstring), in forward order."""
    groups = kept_by_group(space, kept)
    d_attn = model.config.d_attn
    edges: list[Edge] = []
    for layer, block in enumerate(model.transformer.h):
        k = {loc: groups[(layer, loc)] for loc in Location if (layer, loc) in groups}
        c_attn = block.attn.c_attn.weight.detach().cpu()
        for part, (loc, kind) in enumerate(
            [(Location.ATTN_Q, "read_q"), (Location.ATTN_K, "read_k"), (Location.ATTN_V, "read_v")]
        ):
            w = c_attn[part * d_attn : (part + 1) * d_attn]
            for j, r, v in _pairs(w, k[loc], k[Location.ATTN_IN]):
                edges.append(Edge(Node(layer, Location.ATTN_IN, r), Node(layer, loc, j), kind, v))
        w = block.attn.c_proj.weight.detach().cpu()
        for i, j, v in _pairs(w, k[Location.ATTN_OUT], k[Location.ATTN_V]):
            edges.append(
                Edge(
                    Node(layer, Location.ATTN_V, j), Node(layer, Location.ATTN_OUT, i), "v_write", v
                )
            )
        w = block.mlp.c_fc.weight.detach().cpu()
        for j, r, v in _pairs(w, k[Location.MLP_NEURON], k[Location.MLP_IN]):
            edges.append(
                Edge(
                    Node(layer, Location.MLP_IN, r),
                    Node(layer, Location.MLP_NEURON, j),
                    "read_neuron",
                    v,
                )
            )
        w = block.mlp.c_proj.weight.detach().cpu()
        for i, j, v in _pairs(w, k[Location.MLP_OUT], k[Location.MLP_NEURON]):
            edges.append(
                Edge(
                    Node(layer, Location.MLP_NEURON, j),
                    Node(layer, Location.MLP_OUT, i),
                    "neuron_write",
                    v,
                )
            )
    edges += _residual_edges(space, groups)
    if space.mask_embed:
        edges += _embed_edges(model, space, groups)
    return edges


def _reads_after(space: NodeSpace, layer: int, loc: Location) -> list[tuple[int, Location]]:
    """Read locations that come after the write ``(layer, loc)`` in the forward pass."""
    out = [(layer, Location.MLP_IN)] if loc is Location.ATTN_OUT else []
    for later in range(layer + 1, space.config.n_layer):
        out += [(later, r) for r in READS]
    return out


def _residual_edges(space: NodeSpace, groups: dict) -> list[Edge]:
    edges = []
    for layer in range(space.config.n_layer):
        for wloc in WRITES:
            writes = set(groups[(layer, wloc)].tolist())
            for rl, rloc in _reads_after(space, layer, wloc):
                for c in sorted(writes.intersection(groups[(rl, rloc)].tolist())):
                    edges.append(Edge(Node(layer, wloc, c), Node(rl, rloc, c), "residual", 1.0))
    return edges


def _embed_edges(model: GPT, space: NodeSpace, groups: dict) -> list[Edge]:
    wte = model.transformer.wte.weight.detach().cpu()
    tokens = groups[(-1, Location.EMBED)]
    edges = []
    for layer in range(space.config.n_layer):
        for rloc in READS:
            for t, c, v in _pairs(wte, tokens, groups[(layer, rloc)]):
                edges.append(Edge(Node(-1, Location.EMBED, t), Node(layer, rloc, c), "embed", v))
    return edges


def count_by_kind(edges: list[Edge]) -> dict[str, int]:
    """{kind: count} for every kind (zeros included), in :data:`KINDS` order."""
    counts = Counter(e.kind for e in edges)
    return {kind: counts.get(kind, 0) for kind in KINDS}
