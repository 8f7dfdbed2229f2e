"""Circuit nodes: which activations can be pruned, and a flat numbering of all of them.

A node is one channel at one of the paper's 8 mask locations of a layer (a residual read, a
q/k/v channel, an MLP neuron or a residual write), or optionally one vocabulary entry of the
token embedding. Masks are applied at the hook sites of ``model/hooks.py``, i.e. after AbsTopK,
as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

from sparsecircuits.errors import InputError
from sparsecircuits.model.config import GPTConfig


class Location(StrEnum):
    """The paper's 8 node locations per layer, plus the optional token-embedding mask."""

    ATTN_IN = "attn_in"  # residual read of attention (after ln_1)
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_OUT = "attn_out"  # residual write of attention (after c_proj)
    MLP_IN = "mlp_in"  # residual read of the MLP (after ln_2)
    MLP_NEURON = "mlp_neuron"  # post-activation neurons
    MLP_OUT = "mlp_out"  # residual write of the MLP
    EMBED = "embed"  # one node per vocabulary token (layer -1)


LAYER_LOCATIONS: tuple[Location, ...] = tuple(Location)[:8]  # forward order within a block

# Hook site (relative to the block) whose activation a location's mask gates.
SITE: dict[Location, str] = {
    Location.ATTN_IN: "attn.act_in",
    Location.ATTN_Q: "attn.q",
    Location.ATTN_K: "attn.k",
    Location.ATTN_V: "attn.v",
    Location.ATTN_OUT: "attn.resid_delta",
    Location.MLP_IN: "mlp.act_in",
    Location.MLP_NEURON: "mlp.post_act",
    Location.MLP_OUT: "mlp.resid_delta",
}
READS = (Location.ATTN_IN, Location.MLP_IN)
WRITES = (Location.ATTN_OUT, Location.MLP_OUT)
QKV = (Location.ATTN_Q, Location.ATTN_K, Location.ATTN_V)


def location_size(config: GPTConfig, loc: Location) -> int:
    """Number of nodes at ``loc`` in one layer (vocab size for the embedding)."""
    if loc in QKV:
        return config.d_attn
    if loc is Location.MLP_NEURON:
        return config.mlp_width
    if loc is Location.EMBED:
        return config.vocab_size
    if loc in READS:  # with concatenated positions, channels d_model.. are position channels
        return config.d_model_in
    return config.d_model


@dataclass(frozen=True)
class Node:
    """One node: ``layer`` (-1 for the embedding), ``loc`` and channel ``index``."""

    layer: int
    loc: Location
    index: int

    def head_channel(self, d_head: int) -> tuple[int, int] | None:
        """(head, channel within the head) for q/k/v nodes, else None."""
        return divmod(self.index, d_head) if self.loc in QKV else None

    @property
    def site(self) -> str:
        """Hook site name, e.g. ``1.attn.q`` (``embed`` for embedding nodes)."""
        return "embed" if self.loc is Location.EMBED else f"{self.layer}.{SITE[self.loc]}"

    def label(self, d_head: int) -> str:
        """Readable id: ``1.attn_q.37 (h2.5)``, ``0.mlp_neuron.863``, ``embed.412``."""
        if self.loc is Location.EMBED:
            return f"embed.{self.index}"
        hc = self.head_channel(d_head)
        suffix = f" (h{hc[0]}.{hc[1]})" if hc else ""
        return f"{self.layer}.{self.loc.value}.{self.index}{suffix}"


@dataclass(frozen=True)
class Group:
    """A contiguous block of the flat node vector: all nodes of one (layer, location)."""

    layer: int
    loc: Location
    offset: int
    size: int

    @property
    def key(self) -> str:
        return "embed" if self.loc is Location.EMBED else f"{self.layer}.{self.loc.value}"


class NodeSpace:
    """Every maskable node of a model, numbered in forward order (embedding first if masked)."""

    def __init__(self, config: GPTConfig, *, mask_embed: bool = False) -> None:
        self.config = config
        self.mask_embed = mask_embed
        groups: list[Group] = []
        offset = 0
        if mask_embed:
            groups.append(Group(-1, Location.EMBED, 0, config.vocab_size))
            offset = config.vocab_size
        for layer in range(config.n_layer):
            for loc in LAYER_LOCATIONS:
                size = location_size(config, loc)
                groups.append(Group(layer, loc, offset, size))
                offset += size
        self.groups: tuple[Group, ...] = tuple(groups)
        self.total = offset

    @cached_property
    def _by_key(self) -> dict[tuple[int, Location], Group]:
        return {(g.layer, g.loc): g for g in self.groups}

    def group(self, layer: int, loc: Location) -> Group:
        """The group of ``(layer, loc)``; raises InputError if the model has no such nodes."""
        try:
            return self._by_key[(layer, Location(loc))]
        except (KeyError, ValueError):
            raise InputError(f"no node location {loc!r} in layer {layer}") from None

    def flat_index(self, node: Node) -> int:
        """Position of ``node`` in the flat vector."""
        g = self.group(node.layer, node.loc)
        if not 0 <= node.index < g.size:
            raise InputError(f"node index {node.index} outside [0, {g.size}) at {g.key}")
        return g.offset + node.index

    def node(self, flat: int) -> Node:
        """The node at flat position ``flat``."""
        for g in self.groups:
            if g.offset <= flat < g.offset + g.size:
                return Node(g.layer, g.loc, flat - g.offset)
        raise InputError(f"flat node index {flat} outside [0, {self.total})")

    def nodes(self, flat_indices) -> list[Node]:
        """Nodes of many flat positions, in the given order."""
        return [self.node(int(i)) for i in flat_indices]
