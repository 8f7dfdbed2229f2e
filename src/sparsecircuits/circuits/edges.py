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

from sparsecircuits.circuits.nodes import LAYER_LOCATIONS, READS, WRITES, Location, Node, NodeSpace
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


@dataclass(frozen=True)
class EdgeSet:
    """Edges as arrays (fast for circuits with millions of edges): flat node indices of the
    endpoints ``src``/``dst`` (E,) int64, ``kind`` (E,) int64 index into :data:`KINDS`,
    ``weight`` (E,) float32 (1.0 for residual links)."""

    src: torch.Tensor
    dst: torch.Tensor
    kind: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return int(self.src.numel())

    def count_by_kind(self) -> dict[str, int]:
        """{kind: count} for every kind (zeros included), in :data:`KINDS` order."""
        counts = torch.bincount(self.kind, minlength=len(KINDS)).tolist()
        return dict(zip(KINDS, counts, strict=True))

    def edges(self, space: NodeSpace) -> list[Edge]:
        """The edges as :class:`Edge` objects (slow for very large sets)."""
        src, dst = space.nodes(self.src.tolist()), space.nodes(self.dst.tolist())
        return [
            Edge(s, d, KINDS[k], w)
            for s, d, k, w in zip(src, dst, self.kind.tolist(), self.weight.tolist(), strict=True)
        ]


class _Builder:
    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]] = []

    def weights(
        self, w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *, src_off: int,
        dst_off: int, kind: str, rows_are_src: bool = False,
    ) -> None:  # fmt: skip
        """Nonzeros of ``w[rows][:, cols]``; by default columns are sources (``y = W x``)."""
        if rows.numel() == 0 or cols.numel() == 0:
            return
        sub = w.index_select(0, rows).index_select(1, cols)
        i, j = sub.nonzero(as_tuple=True)
        r, c = rows[i], cols[j]
        src, dst = (r, c) if rows_are_src else (c, r)
        self.parts.append((src + src_off, dst + dst_off, KINDS.index(kind), sub[i, j]))

    def links(self, channels: torch.Tensor, *, src_off: int, dst_off: int) -> None:
        if channels.numel():
            ones = torch.ones(channels.numel())
            self.parts.append(
                (channels + src_off, channels + dst_off, KINDS.index("residual"), ones)
            )

    def build(self) -> EdgeSet:
        if not self.parts:
            empty = torch.zeros(0, dtype=torch.long)
            return EdgeSet(empty, empty, empty, torch.zeros(0))
        return EdgeSet(
            torch.cat([p[0] for p in self.parts]),
            torch.cat([p[1] for p in self.parts]),
            torch.cat([torch.full((p[0].numel(),), p[2]) for p in self.parts]),
            torch.cat([p[3].float() for p in self.parts]),
        )


@torch.no_grad()
def edge_set(model: GPT, space: NodeSpace, kept: torch.Tensor) -> EdgeSet:
    """Every edge between kept nodes (see the module docstring), in forward order."""
    groups = kept_by_group(space, kept)
    d_attn = model.config.d_attn
    b = _Builder()

    def off(layer: int, loc: Location) -> int:
        return space.group(layer, loc).offset

    for layer, block in enumerate(model.transformer.h):
        k = {loc: groups[(layer, loc)] for loc in LAYER_LOCATIONS}
        c_attn = block.attn.c_attn.weight.detach().cpu()
        for part, (loc, kind) in enumerate(
            [(Location.ATTN_Q, "read_q"), (Location.ATTN_K, "read_k"), (Location.ATTN_V, "read_v")]
        ):
            w = c_attn[part * d_attn : (part + 1) * d_attn]
            b.weights(w, k[loc], k[Location.ATTN_IN], src_off=off(layer, Location.ATTN_IN),
                      dst_off=off(layer, loc), kind=kind)  # fmt: skip
        b.weights(block.attn.c_proj.weight.detach().cpu(), k[Location.ATTN_OUT],
                  k[Location.ATTN_V], src_off=off(layer, Location.ATTN_V),
                  dst_off=off(layer, Location.ATTN_OUT), kind="v_write")  # fmt: skip
        b.weights(block.mlp.c_fc.weight.detach().cpu(), k[Location.MLP_NEURON],
                  k[Location.MLP_IN], src_off=off(layer, Location.MLP_IN),
                  dst_off=off(layer, Location.MLP_NEURON), kind="read_neuron")  # fmt: skip
        b.weights(block.mlp.c_proj.weight.detach().cpu(), k[Location.MLP_OUT],
                  k[Location.MLP_NEURON], src_off=off(layer, Location.MLP_NEURON),
                  dst_off=off(layer, Location.MLP_OUT), kind="neuron_write")  # fmt: skip
    for layer in range(space.config.n_layer):
        for wloc in WRITES:
            writes = groups[(layer, wloc)]
            for rl, rloc in _reads_after(space, layer, wloc):
                common = writes[torch.isin(writes, groups[(rl, rloc)])]
                b.links(common, src_off=off(layer, wloc), dst_off=off(rl, rloc))
    if space.mask_embed:
        wte = model.transformer.wte.weight.detach().cpu()
        tokens = groups[(-1, Location.EMBED)]
        d_model = space.config.d_model
        for layer in range(space.config.n_layer):
            for rloc in READS:
                reads = groups[(layer, rloc)]
                reads = reads[reads < d_model]  # position channels do not read the embedding
                b.weights(wte, tokens, reads, src_off=0,
                          dst_off=off(layer, rloc), kind="embed", rows_are_src=True)  # fmt: skip
    return b.build()


def circuit_edges(model: GPT, space: NodeSpace, kept: torch.Tensor) -> list[Edge]:
    """Every edge between kept nodes as :class:`Edge` objects, in forward order."""
    return edge_set(model, space, kept).edges(space)


def _reads_after(space: NodeSpace, layer: int, loc: Location) -> list[tuple[int, Location]]:
    """Read locations that come after the write ``(layer, loc)`` in the forward pass."""
    out = [(layer, Location.MLP_IN)] if loc is Location.ATTN_OUT else []
    for later in range(layer + 1, space.config.n_layer):
        out += [(later, r) for r in READS]
    return out


def count_by_kind(edges: list[Edge] | EdgeSet) -> dict[str, int]:
    """{kind: count} for every kind (zeros included), in :data:`KINDS` order."""
    if isinstance(edges, EdgeSet):
        return edges.count_by_kind()
    counts = Counter(e.kind for e in edges)
    return {kind: counts.get(kind, 0) for kind in KINDS}
