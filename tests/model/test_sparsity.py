"""Weight sparsity: L0 budgets, the top-k projection (checked against brute force), bookkeeping."""

from __future__ import annotations

import pytest
import torch

from sparsecircuits.model import GPT, WeightSparsity, l0_budget, sparse_parameter_names
from sparsecircuits.model.sparsity import project_topk_, row_floor

from .helpers import tiny_config, tiny_model


def brute_force_kept(w: torch.Tensor, k: int, min_per_neuron: int) -> list[float]:
    """Sorted |w| of the entries a correct projection keeps: each row's ``min_per_neuron``
    largest (as many as fit in k), then the largest of the rest. Magnitudes, not positions,
    so ties cannot matter."""
    rows = [sorted(r.abs().tolist(), reverse=True) for r in w]
    j = min(min_per_neuron, w.shape[1], k // w.shape[0])
    protected = [v for r in rows for v in r[:j]]
    rest = sorted((v for r in rows for v in r[j:]), reverse=True)
    return sorted(protected + rest[: k - len(protected)])


def kept_magnitudes(w: torch.Tensor) -> list[float]:
    return sorted(w[w != 0].abs().tolist())


def test_l0_budget_is_the_same_fraction_for_every_shape() -> None:
    assert l0_budget((10, 20), 0.3) == 60  # ceil(0.3 * 200)
    assert l0_budget((10, 20), 0.01) == 2  # the floor never raises the budget
    assert l0_budget((7,), 0.5) == 4  # ceil(3.5)
    assert l0_budget((1000,), 1e-6) == 1  # never zero entries
    assert l0_budget((10, 20), 1.0) == 200
    assert l0_budget((3, 100), 0.07) == 21  # 0.07 * 300 is 21.000000000000004
    # paper scale: exactly 1/1000 in every matrix, whatever its shape
    for shape in [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (2048, 256)]:
        assert l0_budget(shape, 1 / 1000) == -(-shape[0] * shape[1] // 1000)


def test_row_floor_fits_inside_the_budget() -> None:
    assert row_floor((10, 20), 60, min_per_neuron=4) == 4
    assert row_floor((10, 20), 25, min_per_neuron=4) == 2  # only 2 per row fit in 25
    assert row_floor((10, 2), 20, min_per_neuron=4) == 2  # a row cannot keep more than it has
    assert row_floor((2048, 2048), l0_budget((2048, 2048), 1 / 1000), min_per_neuron=4) == 2
    assert row_floor((7,), 4, min_per_neuron=4) == 0  # vectors have no rows


def test_projection_floor_shrinks_when_the_budget_is_tight() -> None:
    w = torch.randn(10, 20, generator=torch.Generator().manual_seed(3))
    w[4] *= 1e-3  # a row that would lose everything without its floor
    original = w.clone()
    project_topk_(w, 25, min_per_neuron=4)
    assert int((w != 0).sum()) == 25
    assert int((w != 0).sum(dim=1).min()) == 2
    assert kept_magnitudes(w) == brute_force_kept(original, 25, 4)


@pytest.mark.parametrize("frac", [0.05, 0.3, 0.7])
def test_projection_keeps_exactly_k_with_rows_protected(frac: float) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=gen)
    # A few rows with tiny weights: globally they would lose every entry without protection.
    w[[2, 7]] *= 1e-3
    original = w.clone()
    k = l0_budget(w.shape, frac)
    project_topk_(w, k, min_per_neuron=4)
    assert int((w != 0).sum()) == k
    assert int((w != 0).sum(dim=1).min()) >= row_floor(w.shape, k, min_per_neuron=4) >= 1
    assert torch.equal(w[w != 0], original[w != 0])  # kept entries are untouched
    assert kept_magnitudes(w) == brute_force_kept(original, k, 4)


def test_projection_of_a_vector_keeps_the_k_largest() -> None:
    w = torch.tensor([0.3, -2.0, 0.1, 1.5, -0.2, 0.05])
    project_topk_(w, 3, min_per_neuron=4)  # min_per_neuron only applies to matrices
    assert torch.equal(w, torch.tensor([0.3, -2.0, 0.0, 1.5, 0.0, 0.0]))


@pytest.mark.parametrize("values", [(1.0,), (1.0, -1.0), (1.0, 2.0, -2.0, 3.0)])
def test_projection_with_ties(values: tuple[float, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    choice = torch.randint(0, len(values), (9, 16), generator=gen)
    w = torch.tensor(values)[choice]
    original = w.clone()
    k = l0_budget(w.shape, 0.4)
    project_topk_(w, k, min_per_neuron=3)
    assert int((w != 0).sum()) == k
    assert int((w != 0).sum(dim=1).min()) >= 3
    assert kept_magnitudes(w) == brute_force_kept(original, k, 3)


def test_projection_is_a_no_op_at_full_budget_and_idempotent() -> None:
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    original = w.clone()
    project_topk_(w, w.numel(), min_per_neuron=4)
    assert torch.equal(w, original)
    project_topk_(w, 20, min_per_neuron=2)
    once = w.clone()
    project_topk_(w, 20, min_per_neuron=2)
    assert torch.equal(w, once)


def block_names(n_layer: int, suffix: str) -> list[str]:
    parts = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return [f"transformer.h.{i}.{p}.{suffix}" for i in range(n_layer) for p in parts]


def test_sparse_parameter_names_and_dense_flags() -> None:
    model = GPT(tiny_config(learnable_bigram_table=True))
    weights, biases = block_names(2, "weight"), block_names(2, "bias")
    embeddings = ["transformer.wte.weight", "transformer.wpe.weight"]
    names = sparse_parameter_names(model)
    assert sorted(names) == sorted([*weights, *biases, *embeddings, "lm_head.weight"])
    # Norm weights, sink logits and the bigram table are never sparsified.
    assert not any("ln_" in n or "sink" in n or "bigram" in n for n in names)

    assert sorted(sparse_parameter_names(model, dense_embeddings=True)) == sorted(
        [*weights, *biases, "lm_head.weight"]
    )
    assert sorted(sparse_parameter_names(model, dense_unembed=True)) == sorted(
        [*weights, *biases, *embeddings]
    )
    assert sorted(sparse_parameter_names(model, dense_biases=True)) == sorted(
        [*weights, *embeddings, "lm_head.weight"]
    )
    all_dense = sparse_parameter_names(
        model, dense_embeddings=True, dense_unembed=True, dense_biases=True
    )
    assert sorted(all_dense) == sorted(weights)
    no_bias = GPT(tiny_config(bias=False))
    assert not any(n.endswith(".bias") for n in sparse_parameter_names(no_bias))


def test_tied_embedding_is_listed_once_and_follows_dense_embeddings() -> None:
    model = GPT(tiny_config(tied_unembed=True))
    names = sparse_parameter_names(model)
    assert "lm_head.weight" not in names and names.count("transformer.wte.weight") == 1
    # Like the official is_sparse_param, the shared matrix counts as an embedding.
    assert "transformer.wte.weight" not in sparse_parameter_names(model, dense_embeddings=True)
    assert "transformer.wte.weight" in sparse_parameter_names(model, dense_unembed=True)


def test_weight_sparsity_projects_and_reports() -> None:
    model = tiny_model(seed=3, tied_unembed=True)
    ws = WeightSparsity(model, sparse_parameter_names(model), min_per_neuron=4)
    frac = 0.1
    ws.project_(frac)
    report = {r.name: r for r in ws.report(frac)}
    assert set(report) == set(ws.params)
    for name, p in ws.params.items():
        r = report[name]
        assert r.shape == tuple(p.shape) and r.numel == p.numel()
        assert r.budget == l0_budget(p.shape, frac)
        assert r.nonzero == int((p != 0).sum()) == r.budget  # all entries random: none was 0
        if p.dim() == 2:
            assert r.min_row_nonzero == int((p != 0).sum(1).min()) >= r.row_floor
            assert r.row_floor == min(4, r.budget // p.shape[0])
        else:
            assert r.min_row_nonzero is None
    # The tied unembedding is the projected embedding itself.
    assert (model.lm_head.weight != 0).sum() == report["transformer.wte.weight"].nonzero
    # Parameters outside the list are untouched.
    assert (model.transformer.ln_f.weight != 0).all()
    assert (model.transformer.h[0].attn.attn_imp.sink_logit != 0).all()


def test_weight_sparsity_dense_fraction_is_a_no_op_and_unknown_names_fail() -> None:
    model = tiny_model(seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ws = WeightSparsity(model, sparse_parameter_names(model))
    ws.project_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(KeyError, match="no_such"):
        WeightSparsity(model, ["no_such.weight"])
