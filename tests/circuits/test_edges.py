"""Circuit edges against a brute-force enumeration, and the flat node numbering."""

from __future__ import annotations

import pytest
import torch

from sparsecircuits.circuits.edges import KINDS, WEIGHT_KINDS, circuit_edges, count_by_kind
from sparsecircuits.circuits.nodes import LAYER_LOCATIONS, Location, Node, NodeSpace
from sparsecircuits.errors import InputError
from tests.circuits.conftest import sparsify_
from tests.model.helpers import tiny_model

L = Location


def _sparse_model(seed: int = 0):
    model = sparsify_(tiny_model(seed), frac_zero=0.8, seed=seed)
    w = model.transformer.h[0].mlp.c_fc.weight
    assert 0.1 < float((w != 0).float().mean()) < 0.3  # really sparse, not empty
    return model


def _random_kept(space: NodeSpace, frac: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nonzero(torch.rand(space.total, generator=gen) < frac).flatten()


def _brute_force(model, space: NodeSpace, kept: torch.Tensor) -> set[tuple]:
    """Every edge by looping over every weight entry in pure Python: (src, dst, kind, weight)."""
    on = {space.node(int(i)) for i in kept}
    d_attn = model.config.d_attn
    edges: set[tuple] = set()

    def scan(w: torch.Tensor, src_of, dst_of, kind: str) -> None:
        rows = w.tolist()
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if v == 0.0:
                    continue
                src, dst = src_of(i, j), dst_of(i, j)
                if src in on and dst in on:
                    edges.add((src, dst, kind, v))

    for layer, block in enumerate(model.transformer.h):
        c_attn = block.attn.c_attn.weight.detach()
        for part, (loc, kind) in enumerate([(L.ATTN_Q, "read_q"), (L.ATTN_K, "read_k"),
                                            (L.ATTN_V, "read_v")]):  # fmt: skip
            w = c_attn[part * d_attn : (part + 1) * d_attn]  # (out = q/k/v channel, in = read)
            scan(w, lambda i, j, lay=layer: Node(lay, L.ATTN_IN, j),
                 lambda i, j, lay=layer, loc=loc: Node(lay, loc, i), kind)  # fmt: skip
        scan(block.attn.c_proj.weight.detach(), lambda i, j, lay=layer: Node(lay, L.ATTN_V, j),
             lambda i, j, lay=layer: Node(lay, L.ATTN_OUT, i), "v_write")  # fmt: skip
        scan(block.mlp.c_fc.weight.detach(), lambda i, j, lay=layer: Node(lay, L.MLP_IN, j),
             lambda i, j, lay=layer: Node(lay, L.MLP_NEURON, i), "read_neuron")  # fmt: skip
        scan(block.mlp.c_proj.weight.detach(), lambda i, j, lay=layer: Node(lay, L.MLP_NEURON, j),
             lambda i, j, lay=layer: Node(lay, L.MLP_OUT, i), "neuron_write")  # fmt: skip
    n_layer, d = model.config.n_layer, model.config.d_model
    for layer in range(n_layer):
        for wloc in (L.ATTN_OUT, L.MLP_OUT):
            reads = [(layer, L.MLP_IN)] if wloc is L.ATTN_OUT else []
            reads += [(r, loc) for r in range(layer + 1, n_layer) for loc in (L.ATTN_IN, L.MLP_IN)]
            for c in range(d):
                for rl, rloc in reads:
                    src, dst = Node(layer, wloc, c), Node(rl, rloc, c)
                    if src in on and dst in on:
                        edges.add((src, dst, "residual", 1.0))
    if space.mask_embed:
        wte = model.transformer.wte.weight.detach().tolist()
        for t, row in enumerate(wte):
            for c, v in enumerate(row):
                for layer in range(n_layer):
                    for rloc in (L.ATTN_IN, L.MLP_IN):
                        src, dst = Node(-1, L.EMBED, t), Node(layer, rloc, c)
                        if v != 0.0 and src in on and dst in on:
                            edges.add((src, dst, "embed", v))
    return edges


def _counts(edges: set[tuple]) -> dict[str, int]:
    return {k: sum(1 for e in edges if e[2] == k) for k in KINDS}


@pytest.mark.parametrize(
    ("mask_embed", "frac", "seed"),
    [(False, 0.5, 0), (False, 0.2, 1), (True, 0.5, 2), (True, 0.9, 3)],
)
def test_edges_match_brute_force(mask_embed, frac, seed):
    model = _sparse_model(seed)
    space = NodeSpace(model.config, mask_embed=mask_embed)
    kept = _random_kept(space, frac, seed)
    edges = circuit_edges(model, space, kept)
    want = _brute_force(model, space, kept)
    got = [(e.src, e.dst, e.kind, e.weight) for e in edges]
    assert len(got) == len(set(got))  # no edge listed twice
    assert count_by_kind(edges) == _counts(want)
    assert set(got) == want
    present = {k for k, n in _counts(want).items() if n > 0}  # no comparison is vacuous
    assert present == (set(KINDS) if mask_embed else set(KINDS) - {"embed"})


def test_edges_of_empty_and_single_node_circuits():
    model = _sparse_model()
    space = NodeSpace(model.config, mask_embed=True)
    assert circuit_edges(model, space, torch.tensor([], dtype=torch.long)) == []
    assert circuit_edges(model, space, torch.tensor([space.total - 1])) == []
    counts = count_by_kind([])
    assert list(counts) == list(KINDS) and set(counts.values()) == {0}
    assert set(WEIGHT_KINDS) == set(KINDS) - {"residual"}


def test_all_nodes_kept_counts_every_nonzero_weight():
    model = _sparse_model()
    space = NodeSpace(model.config)
    counts = count_by_kind(circuit_edges(model, space, torch.arange(space.total)))
    nz = sum(
        int((m.weight != 0).sum())
        for b in model.transformer.h
        for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
    )
    assert sum(counts[k] for k in WEIGHT_KINDS) == nz
    d, n = model.config.d_model, model.config.n_layer
    # attn_out -> (same-layer mlp_in + 2 reads per later layer), mlp_out -> 2 per later layer
    want_resid = sum(d * (1 + 2 * (n - 1 - lay)) + d * 2 * (n - 1 - lay) for lay in range(n))
    assert counts["residual"] == want_resid


# ------------------------------------------------------------------------------ NodeSpace
@pytest.mark.parametrize("mask_embed", [False, True])
def test_node_space_numbering_round_trip_and_sizes(mask_embed):
    cfg = tiny_model().config
    space = NodeSpace(cfg, mask_embed=mask_embed)
    per_layer = 4 * cfg.d_model + 3 * cfg.d_attn + cfg.mlp_width
    embed = cfg.vocab_size if mask_embed else 0
    assert space.total == cfg.n_layer * per_layer + embed
    for layer in range(cfg.n_layer):
        sizes = {loc: space.group(layer, loc).size for loc in LAYER_LOCATIONS}
        assert sum(sizes.values()) == per_layer
        assert sizes[L.ATTN_Q] == sizes[L.ATTN_K] == sizes[L.ATTN_V] == cfg.d_attn
        assert sizes[L.MLP_NEURON] == cfg.mlp_width
        assert sizes[L.ATTN_IN] == sizes[L.ATTN_OUT] == sizes[L.MLP_IN] == cfg.d_model
    # Groups tile [0, total) in forward order, embedding first.
    offset = 0
    for g in space.groups:
        assert g.offset == offset
        offset += g.size
    assert offset == space.total
    assert (space.groups[0].loc is L.EMBED) == mask_embed
    for flat in range(space.total):
        node = space.node(flat)
        assert space.flat_index(node) == flat
    assert space.nodes([3, 0]) == [space.node(3), space.node(0)]
    with pytest.raises(InputError):
        space.node(space.total)
    with pytest.raises(InputError):
        space.flat_index(Node(0, L.ATTN_Q, cfg.d_attn))
    with pytest.raises(InputError):
        space.group(cfg.n_layer, L.ATTN_IN)
    if not mask_embed:
        with pytest.raises(InputError):
            space.flat_index(Node(-1, L.EMBED, 0))


def test_node_labels():
    d_head = 8
    assert Node(1, L.ATTN_Q, 37).label(d_head) == "1.attn_q.37 (h4.5)"
    assert Node(0, L.MLP_NEURON, 3).label(d_head) == "0.mlp_neuron.3"
    assert Node(-1, L.EMBED, 9).label(d_head) == "embed.9"
    assert Node(1, L.MLP_OUT, 2).site == "1.mlp.resid_delta"
