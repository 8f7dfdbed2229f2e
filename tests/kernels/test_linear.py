"""CSR products and the sparse linear layer against dense torch, on both backends."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecircuits.kernels import LinearKernelState, build_pattern, sparse_linear
from sparsecircuits.kernels._lib import ENV, library_path
from sparsecircuits.kernels.crossover import ENV as BELOW
from sparsecircuits.kernels.csr import gather
from sparsecircuits.kernels.linear import Regrowth, regrow_weight_grad, sddmm, spmm

BACKENDS = ["torch"] + (["cpp"] if library_path() is not None else [])


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32 result vs a float64 reference: max error under 1e-5 of the tensor's scale
    (a fixed atol fails by an ulp or two where large partial sums cancel)."""
    assert got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= 1e-5 * max(1.0, want.abs().max().item() if want.numel() else 0.0), err


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(BELOW, "1.01")  # every weight takes the sparse path
    yield


def _weight(seed: int, out_f: int, in_f: int, density: float, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
    if kind == "empty_rows":
        w[::3] = 0.0
    elif kind == "empty_cols":
        w[:, ::2] = 0.0
    elif kind == "all_zero":
        w.zero_()
    return w


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_tok=st.integers(1, 100),
    in_f=st.integers(1, 70),
    out_f=st.integers(1, 70),
    density=st.sampled_from([0.0, 1 / 256, 1 / 64, 1 / 16, 1 / 4, 0.7, 1.0]),
    kind=st.sampled_from(["plain", "empty_rows", "empty_cols", "all_zero"]),
    bias=st.booleans(),
    lead=st.sampled_from([(), (2,), (3, 1)]),
)
def test_sparse_linear_matches_dense_fwd_and_bwd(
    seed, n_tok, in_f, out_f, density, kind, bias, lead
) -> None:
    w0 = _weight(seed, out_f, in_f, density, kind)
    g = torch.Generator().manual_seed(seed + 7)
    x0 = torch.randn(*lead, n_tok, in_f, generator=g)
    b0 = torch.randn(out_f, generator=g) if bias else None
    gy = torch.randn(*lead, n_tok, out_f, generator=g)
    ref_in = [t.double().requires_grad_(True) for t in (x0, w0, *([b0] if bias else []))]
    y_ref = F.linear(ref_in[0], ref_in[1], ref_in[2] if bias else None)
    y_ref.backward(gy.double())
    for name in BACKENDS:
        os.environ[ENV] = name
        for mode in ("dense", "support", "regrow"):
            ins = [t.clone().requires_grad_(True) for t in (x0, w0, *([b0] if bias else []))]
            state = LinearKernelState(grad_mode=mode)
            y = sparse_linear(ins[0], ins[1], ins[2] if bias else None, state)
            y.backward(gy)
            assert state.pattern is not None and state.pattern.nnz == int((w0 != 0).sum())
            assert_close(y, y_ref)
            assert_close(ins[0].grad, ref_in[0].grad)
            on = w0 != 0
            want_dw = ref_in[1].grad if mode == "dense" else ref_in[1].grad * on
            if mode == "regrow":  # exact on the support, a bfloat16 product (or exact) off it
                assert_close(ins[1].grad[on], want_dw[on])
                # bfloat16 inputs (2^-9 relative each), float32 sums, a bfloat16 result
                gy2, x2 = gy.reshape(-1, out_f).double(), x0.reshape(-1, in_f).double()
                bound = 2**-7 * (gy2.abs().t() @ x2.abs()) + 2**-8 * ref_in[1].grad.abs()
                err = (ins[1].grad.double() - ref_in[1].grad).abs()
                assert bool((err[~on] <= bound[~on] + 1e-6).all())
            else:
                assert_close(ins[1].grad, want_dw)
            if bias:
                assert_close(ins[2].grad, ref_in[2].grad)
    os.environ.pop(ENV, None)


@pytest.mark.parametrize("name", BACKENDS)
def test_products_at_training_shapes(name: str, monkeypatch) -> None:
    """Token counts that are and are not multiples of the kernels' 32-token tile."""
    monkeypatch.setenv(ENV, name)
    g = torch.Generator().manual_seed(0)
    for n_tok in (1, 31, 32, 33, 300):
        w = _weight(n_tok, 96, 64, 1 / 16, "plain")
        p = build_pattern(w)
        x = torch.randn(n_tok, 64, generator=g)
        dy = torch.randn(n_tok, 96, generator=g)
        val = w.reshape(-1)[p.flat]
        x64, w64, dy64 = x.double(), w.double(), dy.double()
        assert_close(spmm(p.crow, p.col, val, x, None, 96), x64 @ w64.t())
        dx = spmm(p.crow_t, p.col_t, val[p.perm].contiguous(), dy, None, 64)
        assert_close(dx, dy64 @ w64)
        assert_close(sddmm(p, dy, x), (dy64.t() @ x64).reshape(-1)[p.flat])


@pytest.mark.parametrize("mode", ["support", "regrow"])
@pytest.mark.parametrize("density", [1 / 16, 1 / 3])  # 1/3: rows of W and W^T past 8 entries
@pytest.mark.parametrize("n_tok", [1, 33, 300])
def test_fused_backward_equals_the_separate_products(n_tok: int, density: float, mode) -> None:
    """The support and regrowth backwards' one pass over dy (dx, bias and support gradients,
    the latter summed in W^T's order) gives bitwise the separate kernels' results."""
    g = torch.Generator().manual_seed(n_tok)
    w = _weight(n_tok, 96, 64, density, "empty_rows").requires_grad_(True)
    b = torch.randn(96, generator=g, requires_grad=True)
    x = torch.randn(n_tok, 64, generator=g, requires_grad=True)
    dy = torch.randn(n_tok, 96, generator=g)
    sparse_linear(x, w, b, LinearKernelState(grad_mode=mode)).backward(dy)
    p = build_pattern(w.detach())
    val = w.detach().reshape(-1)[p.flat]
    db = torch.empty(96)
    dx = spmm(p.crow_t, p.col_t, val[p.perm].contiguous(), dy, None, 64, x_col_sum=db)
    if mode == "regrow":
        dw, _ = regrow_weight_grad(p, dy, x.detach())
    else:
        dw = sddmm(p, dy, x.detach(), dense_out=torch.zeros(96, 64))
    assert torch.equal(x.grad, dx) and torch.equal(w.grad, dw) and torch.equal(b.grad, db)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(("n_tok", "share"), [(300, 0.3), (33, 0.5), (5, 0.01)])
def test_regrowth_share_estimates_off_support_from_leading_tokens(name, n_tok, share, monkeypatch):
    """A regrowth step with share s: off the support dW is (n / m) dy[:m]^T x[:m] for the
    first m = max(2, ceil(s n)) tokens (float32 here), on it the exact gradient over all n
    tokens; the one-pass backward and the separate kernels agree bitwise."""
    monkeypatch.setenv(ENV, name)
    g = torch.Generator().manual_seed(n_tok)
    w = _weight(n_tok, 96, 64, 1 / 16, "plain").requires_grad_(True)
    x = torch.randn(n_tok, 64, generator=g, requires_grad=True)
    dy = torch.randn(n_tok, 96, generator=g)
    regrowth = Regrowth(bf16=False, share=share)
    m, h = regrowth.split(n_tok)
    assert m == max(2, -(-round(share * 1000) * n_tok // 1000)) and h == m // 2  # ceil, >= 2
    sparse_linear(x, w, None, LinearKernelState(grad_mode="regrow", regrowth=regrowth)).backward(dy)
    on = w.detach() != 0
    x64, dy64 = x.detach().double(), dy.double()
    assert_close(w.grad[on], (dy64.t() @ x64)[on])
    assert_close(w.grad[~on], (n_tok / m * (dy64[:m].t() @ x64[:m]))[~on])
    assert_close(x.grad, dy64 @ w.detach().double())
    p = build_pattern(w.detach())
    assert torch.equal(w.grad, regrow_weight_grad(p, dy, x.detach(), regrowth)[0])


@pytest.mark.parametrize("name", BACKENDS)
def test_regrowth_excess_is_the_subset_token_noise(name: str, monkeypatch) -> None:
    """Zero-mean token noise: from a quarter of the tokens the off-support squared norm is ~4x
    the full product's; minus the measured excess it is the full product's again (over 20
    seeds: mean 1.009, sd 0.03 of it; 0.15 is 5 sd). Identical tokens carry no noise."""
    monkeypatch.setenv(ENV, name)
    g = torch.Generator().manual_seed(0)
    n, out_f, in_f = 2048, 256, 192
    dy, x = torch.randn(n, out_f, generator=g) / n, torch.randn(n, in_f, generator=g)
    p = build_pattern(_weight(0, out_f, in_f, 1 / 16, "plain"))
    off = torch.ones(out_f * in_f, dtype=torch.bool)
    off[p.flat] = False
    full = float((dy.t() @ x).reshape(-1)[off].pow(2).sum())
    dw, excess = regrow_weight_grad(p, dy, x, Regrowth(bf16=False, share=0.25))
    est = float(dw.reshape(-1)[off].pow(2).sum())
    assert est > 3 * full
    assert abs(est - excess - full) < 0.15 * full
    same_dy, same_x = dy[:1].expand(n, -1).contiguous(), x[:1].expand(n, -1).contiguous()
    dw, excess = regrow_weight_grad(p, same_dy, same_x, Regrowth(bf16=False, share=0.25))
    assert 0.0 <= excess <= 1e-6 * float(dw.pow(2).sum())


def test_regrowth_subsets_are_whole_sequences() -> None:
    """The subset and its halves are whole sequences (at least two), else every row."""
    quarter = Regrowth(share=0.25, seq=256)
    assert quarter.split(16 * 256) == (4 * 256, 2 * 256)
    assert quarter.split(4 * 256) == (2 * 256, 256)  # one sequence would not halve
    assert quarter.split(2 * 256) == (512, 512)  # too few sequences: all of them
    assert quarter.split(1000) == (250, 125)  # not whole sequences: rows
    assert Regrowth(share=1.0, seq=256).split(4096) == (4096, 4096)
    with pytest.raises(ValueError, match="seq"):
        Regrowth(seq=0)


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5, float("nan")])
def test_regrowth_share_outside_zero_one_is_an_error(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        Regrowth(share=share)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("n", [0, 5, 20000])  # one thread below 16384 indices, all above
def test_gather_equals_indexing(name: str, n: int, monkeypatch) -> None:
    monkeypatch.setenv(ENV, name)
    w = torch.randn(300, 200)
    idx = torch.randint(0, w.numel(), (n,))
    assert torch.equal(gather(w, idx), w.reshape(-1)[idx])
    assert torch.equal(gather(w.t(), idx), w.t().reshape(-1)[idx])  # strided: logical order


def test_pattern_is_identical_on_both_backends_and_transposes(monkeypatch) -> None:
    w = _weight(3, 37, 53, 0.1, "empty_rows")
    pats = []
    for name in BACKENDS:
        monkeypatch.setenv(ENV, name)
        pats.append(build_pattern(w))
    for p in pats:
        dense_t = torch.zeros(53, 37)
        rows = torch.repeat_interleave(torch.arange(53), p.crow_t.diff())
        dense_t[rows, p.col_t.long()] = w.reshape(-1)[p.flat][p.perm]
        assert torch.equal(dense_t, w.t())
        for f in ("crow", "col", "flat", "crow_t", "col_t", "perm"):
            assert torch.equal(getattr(p, f), getattr(pats[0], f)), f


def test_cached_pattern_follows_in_place_weight_changes() -> None:
    w = _weight(0, 16, 16, 0.2, "plain")
    state = LinearKernelState()
    x = torch.randn(4, 16)
    sparse_linear(x, w, None, state)
    first = state.pattern
    sparse_linear(x, w, None, state)
    assert state.pattern is first  # unchanged weight: no rebuild
    w[0, 0] = 5.0  # in-place edit bumps the version counter
    assert_close(sparse_linear(x, w, None, state), x.double() @ w.double().t())
    assert state.pattern is not first


def test_inference_reuses_gathered_values_until_the_weight_changes() -> None:
    w = _weight(1, 12, 20, 0.3, "plain")
    b = torch.randn(12)
    state = LinearKernelState()
    x = torch.randn(3, 20)
    with torch.no_grad():
        assert_close(sparse_linear(x, w, b, state), x.double() @ w.double().t() + b.double())
        values = state.values
        sparse_linear(x, w, b, state)
        assert state.values is values  # unchanged weight: no second gather
        w.mul_(2.0)  # same support, new values: the cache must not serve the old ones
        assert_close(sparse_linear(x, w, b, state), x.double() @ w.double().t() + b.double())
        assert state.values is not values
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        wi = w.clone()
        sparse_linear(x, wi, b, state)
        wi.mul_(-1.0)
        assert_close(sparse_linear(x, wi, b, state), x.double() @ wi.double().t() + b.double())
    # With gradients the autograd path runs (and gives the same product).
    wg = w.clone().requires_grad_()
    y = sparse_linear(x, wg, b, state)
    assert y.grad_fn is not None
    assert_close(y.detach(), x.double() @ w.double().t() + b.double())


def test_dense_weights_and_other_dtypes_take_the_dense_path(monkeypatch) -> None:
    monkeypatch.setenv(BELOW, "0.5")
    state = LinearKernelState()
    w = torch.randn(8, 8)  # density 1 > 0.5: F.linear, no pattern cached
    sparse_linear(torch.randn(2, 8), w, None, state)
    assert state.pattern is None
    w64 = torch.randn(8, 8, dtype=torch.float64) * (torch.rand(8, 8) < 0.1)
    y = sparse_linear(torch.randn(2, 8, dtype=torch.float64), w64, None, state)
    assert y.dtype == torch.float64 and state.pattern is None
    monkeypatch.setenv(BELOW, "0")
    sparse_linear(torch.randn(2, 8), w * 0, None, state)
    assert state.pattern is None


def test_mixed_dtypes_inference_tensors_and_cpu_autocast_stay_correct(monkeypatch) -> None:
    w = _weight(5, 12, 10, 0.2, "plain")
    x = torch.randn(6, 10)
    p = build_pattern(w)
    b64 = torch.randn(12, dtype=torch.float64)  # not raw float32: the kernels must not read it
    y = spmm(p.crow, p.col, w.reshape(-1)[p.flat], x, b64, 12)
    assert_close(y, x.double() @ w.double().t() + b64)
    with torch.inference_mode():
        wi, xi = w.clone(), x.clone()
        state = LinearKernelState()
        for _ in range(2):  # inference tensors have no version counter: nothing is cached
            torch.testing.assert_close(sparse_linear(xi, wi, None, state), F.linear(xi, wi))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_linear(x, w, None, LinearKernelState())
    assert y.dtype == torch.bfloat16  # autocast's own F.linear, not the float32 kernels


@pytest.mark.parametrize("name", BACKENDS)
def test_support_gradient_of_a_transposed_weight(name: str) -> None:
    """A non-contiguous weight (a transposed view) in support mode: the gradient buffer is
    contiguous whatever the weight's strides, on both backends."""
    os.environ[ENV] = name
    g = torch.Generator().manual_seed(4)
    wp = torch.randn(40, 24, generator=g) * (torch.rand(40, 24, generator=g) < 0.1)
    w = wp.t().requires_grad_(True)  # (24, 40), strides (1, 24)
    x = torch.randn(7, 40, generator=g)
    state = LinearKernelState(grad_mode="support")
    sparse_linear(x, w, None, state).sum().backward()
    assert state.used_sparse
    want = (torch.ones(7, 24).t() @ x) * (wp.t() != 0)
    assert_close(w.grad, want)
    os.environ.pop(ENV, None)


@pytest.mark.parametrize("fused", [True, False])
def test_support_sparse_mode_returns_the_support_gradient_as_coo(fused: bool) -> None:
    """ "support_sparse": the weight gradient is a sparse COO tensor at the nonzeros, in flat
    order, whose dense form is bitwise "support" mode's gradient; dx and the bias gradient
    are unchanged. ``fused``: the one-pass backward (x needs a gradient), else the SDDMM."""
    g = torch.Generator().manual_seed(3)
    w0 = _weight(3, 96, 64, 1 / 8, "empty_rows")
    b0 = torch.randn(96, generator=g)
    x0 = torch.randn(40, 64, generator=g)
    dy = torch.randn(40, 96, generator=g)
    grads = {}
    for mode in ("support", "support_sparse"):
        w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        x = x0.clone().requires_grad_(fused)
        sparse_linear(x, w, b, LinearKernelState(grad_mode=mode)).backward(dy)
        grads[mode] = (w.grad, b.grad, x.grad)
    coo = grads["support_sparse"][0]
    assert coo.is_sparse and not grads["support"][0].is_sparse
    flat = coo._indices()[0] * 64 + coo._indices()[1]
    assert torch.equal(flat, torch.nonzero(w0.reshape(-1)).squeeze(1))  # nonzeros, in order
    assert torch.equal(coo.to_dense(), grads["support"][0])
    assert torch.equal(grads["support_sparse"][1], grads["support"][1])
    if fused:
        assert torch.equal(grads["support_sparse"][2], grads["support"][2])
