"""AbsTopK and the top-k projection against a sort-based reference, on both backends."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecircuits.kernels import (
    abstopk,
    abstopk_,
    backend,
    gelu_abstopk,
    project_topk_,
    topk_mask,
)
from sparsecircuits.kernels._lib import ENV, library_path
from sparsecircuits.kernels.select import magnitude_keys

BACKENDS = ["torch"] + (["cpp"] if library_path() is not None else [])


def reference_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Stable top-k by a full sort: largest first, ties to the lowest index."""
    order = torch.sort(-score, dim=-1, stable=True).indices[..., :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter(-1, order, True)


def _data(seed: int, shape: tuple[int, int], kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "ties":  # few distinct magnitudes, both signs: many exact ties
        x = (x * 2).round() / 2
    elif kind == "zero_rows":
        x[::2] = 0.0
    elif kind == "sparse":  # mostly zeros, like q/k/v of a weight-sparse model
        x = x * (torch.rand(shape, generator=g) < 0.1)
    elif kind == "scales":  # rows at wildly different scales
        x = x * torch.logspace(-20, 20, shape[0])[:, None]
    return x


def _with_backend(name: str):
    os.environ[ENV] = name


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 40),
    n=st.integers(1, 300),
    kfrac=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "ties", "zero_rows", "sparse", "scales"]),
)
def test_abstopk_matches_the_stable_reference_fwd_and_bwd(seed, rows, n, kfrac, kind) -> None:
    x = _data(seed, (rows, n), kind)
    k = round(kfrac * n)
    want_mask = reference_mask(x.abs(), k)
    want = torch.where(want_mask, x, 0.0)
    gy = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed + 1))
    outs = []
    for name in BACKENDS:
        _with_backend(name)
        xx = x.clone().requires_grad_(True)
        y = abstopk(xx, k)
        y.backward(gy)
        assert torch.equal(y, want), name
        assert torch.equal(xx.grad, torch.where(want_mask, gy, 0.0)), name
        outs.append(y)
    assert all(torch.equal(o, outs[0]) for o in outs)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.sampled_from([9, 64, 257, 1024]),
    kfrac=st.sampled_from([0.05, 0.25, 0.5]),
    noise=st.sampled_from([0.0, 1e-3, 0.05, 0.3]),
    quantize=st.booleans(),
    special=st.sampled_from(["none", "sparse_rows", "nan_inf", "zero_rows", "scale_jumps"]),
)
def test_abstopk_over_many_similar_rows(seed, n, kfrac, noise, quantize, special) -> None:
    """Rows drawn around one base row (how an activation tensor looks), where the kernel
    reuses each row's threshold to bracket the next: ties at the threshold (quantized rows),
    rows that jump scale, sparse, zero and NaN/inf rows in between, against the reference."""
    g = torch.Generator().manual_seed(seed)
    rows = 96
    base = torch.randn(n, generator=g)
    x = base[torch.stack([torch.randperm(n, generator=g) for _ in range(rows)])]
    x = x * (1 + noise * torch.randn(rows, n, generator=g))
    if quantize:
        x = (x * 4).round() / 4
    if special == "sparse_rows":
        x[::3] *= torch.rand(n, generator=g) < 0.1
    elif special == "nan_inf":
        x[5, 0], x[6, 1], x[40, :3] = float("nan"), float("inf"), float("-inf")
    elif special == "zero_rows":
        x[10:20] = 0.0
    elif special == "scale_jumps":
        x[::7] *= 1e3
        x[1::11] *= 1e-30
    k = max(1, round(kfrac * n))
    want_mask = reference_mask(magnitude_keys(x), k)
    for name in BACKENDS:
        _with_backend(name)
        y = abstopk(x.clone().requires_grad_(True), k)
        want = torch.where(want_mask, x, 0.0)
        assert torch.equal(y.isnan(), want.isnan()), name
        assert torch.equal(y.nan_to_num(), want.nan_to_num()), name
        z = x.clone()
        abstopk_(z, k)
        assert torch.equal(z.nan_to_num(), y.detach().nan_to_num()), name


@pytest.mark.parametrize("name", BACKENDS)
def test_abstopk_values_equal_torch_topk_scatter_without_sign_ties(name: str) -> None:
    _with_backend(name)
    x = torch.randn(64, 3, 96)
    x[0, 0] = 0.0  # an all-zero row: every kept entry is a tied zero
    idx = x.abs().topk(24, dim=-1).indices
    want = torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
    assert torch.equal(abstopk(x, 24), want)


@pytest.mark.parametrize("name", BACKENDS)
def test_abstopk_reads_strided_views_without_copying_wrongly(name: str) -> None:
    _with_backend(name)
    qkv = torch.randn(4, 10, 48)
    q = qkv[..., 16:32]  # a split view: rows of 16 with row stride 48
    assert torch.equal(abstopk(q, 4), abstopk(q.contiguous(), 4))
    t = torch.randn(6, 20).t()  # a transposed view: column stride 20
    assert torch.equal(abstopk(t, 3), torch.where(reference_mask(t.abs(), 3), t, 0.0))


def test_abstopk_k_at_or_above_width_is_identity_and_float64_uses_torch() -> None:
    x = torch.randn(3, 5)
    assert abstopk(x, 5) is x
    x64 = torch.randn(8, 12, dtype=torch.float64)
    assert torch.equal(abstopk(x64, 3), torch.where(reference_mask(x64.abs(), 3), x64, 0.0))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 30),
    cols=st.integers(1, 200),
    kfrac=st.floats(0.0, 1.0),
    floor=st.integers(0, 6),
    kind=st.sampled_from(["normal", "ties", "zero_rows", "sparse"]),
)
def test_projection_keeps_exactly_k_with_the_row_floor(seed, rows, cols, kfrac, floor, kind):
    w0 = _data(seed, (rows, cols), kind)
    k = max(1, round(kfrac * rows * cols))
    floor = min(floor, cols, k // rows)
    # Reference: protect each row's stable top-floor, then a stable global top-k.
    score = w0.abs()
    if floor:
        score[reference_mask(score, floor)] = torch.inf
    want_mask = reference_mask(score.view(1, -1), k).view_as(w0)
    results = []
    for name in BACKENDS:
        _with_backend(name)
        w = w0.clone()
        mask = project_topk_(w, k, floor=floor)
        assert torch.equal(mask, want_mask), name
        assert torch.equal(w, torch.where(want_mask, w0, 0.0)), name
        assert int(mask.sum()) == min(k, w.numel())
        if floor:
            assert int(mask.sum(dim=1).min()) >= floor
        results.append(w)
    assert all(torch.equal(r, results[0]) for r in results)


def test_projection_of_a_vector_has_no_floor() -> None:
    b = torch.tensor([0.5, -3.0, 0.1, 2.0])
    mask = project_topk_(b, 2, floor=4)
    assert mask.tolist() == [False, True, False, True]
    assert b.tolist() == [0.0, -3.0, 0.0, 2.0]


def test_topk_mask_edge_cases() -> None:
    s = torch.tensor([[1.0, 1.0, 1.0]])
    assert topk_mask(s, 2).tolist() == [[True, True, False]]
    assert topk_mask(s, 0).sum() == 0 and topk_mask(s, 9).all()


def test_forcing_the_fallback_and_the_compiled_library(force_torch) -> None:
    assert backend() == "torch"
    os.environ[ENV] = "nonsense"
    with pytest.raises(Exception, match="SPARSECIRCUITS_KERNELS"):
        backend()


@pytest.mark.parametrize("name", BACKENDS)
def test_nan_and_inf_order_like_the_float_bits(name: str) -> None:
    """NaN sorts above inf, inf above every number, on both backends alike."""
    _with_backend(name)
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, 1.0, 2.0, 3.0, 0.5, 4.0, -5.0, 6.0, 7.0]])
    y = abstopk(x, 3)
    assert torch.isnan(y[0, 0]) and y[0, 1:].tolist() == [0, 0, 0, 0, 0, 0, 6.0, 7.0]
    w = torch.tensor([[inf, inf], [1.0, 0.5]])
    mask = project_topk_(w, 2, floor=1)  # row 1 keeps its floor although row 0 holds infs
    assert mask.tolist() == [[True, False], [True, False]]


def test_projection_degenerate_budgets() -> None:
    for name in BACKENDS:
        _with_backend(name)
        w = torch.randn(3, 4)
        assert not project_topk_(w, 0, floor=2).any() and not w.any()
        w = torch.randn(3, 4)
        mask = project_topk_(w, 2, floor=4)  # a floor that cannot fit shrinks to k // rows = 0
        assert int(mask.sum()) == 2


def test_compiled_projection_bumps_the_version_counter() -> None:
    for name in BACKENDS:
        _with_backend(name)
        w = torch.randn(8, 8)
        before = w._version
        project_topk_(w, 10, floor=1)
        assert w._version > before, name


@pytest.mark.parametrize("name", BACKENDS)
def test_the_abstopk_backward_reads_strided_gradients(name: str) -> None:
    """The backward's gradient may arrive as a transposed view (e.g. from attention)."""
    _with_backend(name)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=g).requires_grad_(True)
    gy = torch.randn(40, 6, generator=g).t()  # non-contiguous (6, 40)
    y = abstopk(x, 9)
    y.backward(gy)
    assert torch.equal(x.grad, torch.where(reference_mask(x.detach().abs(), 9), gy, 0.0))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 20),
    n=st.integers(1, 100),
    kfrac=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    strided=st.booleans(),
)
def test_gelu_abstopk_matches_the_unfused_pair(seed, rows, n, kfrac, scale, strided) -> None:
    """Same outputs as abstopk(gelu(x)); the fused backward (GELU' by a polynomial erf)
    matches torch's gelu_backward to 1e-5 of the gradient's scale, including row tails that
    are not a multiple of 8 and gradients arriving as transposed views."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * scale
    gy = torch.randn(n, rows, generator=g).t() if strided else torch.randn(rows, n, generator=g)
    k = round(kfrac * n)
    ref = x.clone().requires_grad_(True)
    want = abstopk(torch.nn.functional.gelu(ref), k)
    want.backward(gy)
    for name in BACKENDS:
        _with_backend(name)
        xx = x.clone().requires_grad_(True)
        y = gelu_abstopk(xx, k)
        y.backward(gy)
        assert torch.equal(y, want), name
        err = (xx.grad - ref.grad).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.grad.abs().max().item()), (name, err)


@pytest.mark.parametrize("name", BACKENDS)
def test_without_gradients_no_mask_is_kept_and_values_are_the_same(name: str) -> None:
    _with_backend(name)
    x = _data(11, (33, 70), "ties")
    want = torch.where(reference_mask(x.abs(), 17), x, 0.0)
    with torch.no_grad():
        assert torch.equal(abstopk(x.clone().requires_grad_(True), 17), want)
    assert torch.equal(abstopk(x, 17), want)  # no input requires grad
    g = torch.nn.functional.gelu(x)
    assert torch.equal(gelu_abstopk(x, 17), torch.where(reference_mask(g.abs(), 17), g, 0.0))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 30),
    n=st.integers(1, 200),
    kfrac=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "ties", "zero_rows", "sparse", "scales"]),
    layout=st.sampled_from(["contiguous", "column_slice", "transposed"]),
)
def test_in_place_abstopk_equals_the_reference(seed, rows, n, kfrac, kind, layout) -> None:
    """abstopk_ (no gradients) on the model's layouts: whole tensors, column slices of a
    wider buffer (q, k, v of one product) and views it cannot flatten (copied through)."""
    x = _data(seed, (rows, n), kind)
    k = round(kfrac * n)
    want = torch.where(reference_mask(x.abs(), k), x, 0.0)
    for name in BACKENDS:
        _with_backend(name)
        if layout == "contiguous":
            buf = x.clone()
            view = buf
        elif layout == "column_slice":
            buf = torch.cat([torch.full((rows, 3), 7.0), x, torch.full((rows, 2), 7.0)], 1)
            view = buf[:, 3 : 3 + n]
        else:
            buf = x.t().contiguous()
            view = buf.t()
        out = abstopk_(view, k)
        assert out.data_ptr() == view.data_ptr() and torch.equal(out, want), name
        if layout == "column_slice":  # the rest of the buffer is untouched
            assert (buf[:, :3] == 7).all() and (buf[:, 3 + n :] == 7).all(), name
