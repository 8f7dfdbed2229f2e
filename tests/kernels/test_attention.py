"""Causal attention with a sink: the narrow-head kernel and the torch paths against a float64
reference, forward and backward, on both backends."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecircuits.kernels import causal_attention
from sparsecircuits.kernels._lib import ENV, library_path
from sparsecircuits.kernels.attention import _NarrowAttention

BACKENDS = ["torch"] + (["cpp"] if library_path() is not None else [])


def reference(q, k, v, sink):
    """Softmax attention with an explicit causal mask and the sink as an extra key (float64)."""
    q, k, v = (t.double() for t in (q, k, v))
    B, H, T, D = q.shape
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)
    if sink is not None:
        s = torch.cat([sink.double().view(1, H, 1, 1).expand(B, H, T, 1), s], dim=-1)
        v = torch.cat([v.new_zeros(B, H, 1, D), v], dim=2)
    return torch.softmax(s, dim=-1) @ v


def _inputs(seed, B, H, T, D, layout, scale, density=1.0):
    """q, k, v; with density < 1 most entries are zeros (AbsTopK outputs, as in the model,
    where the kernels score from the queries' nonzero channels), some query rows all zero."""
    g = torch.Generator().manual_seed(seed)
    if layout == "model":  # (B, T, H, D) buffers seen as (B, H, T, D): the model's views
        base = [torch.randn(B, T, H, D, generator=g) * scale for _ in range(3)]
        if density < 1.0:
            base = [t * (torch.rand(t.shape, generator=g) < density) for t in base]
            base[0][:, ::5] = 0.0
        views = lambda ts: [t.transpose(1, 2) for t in ts]  # noqa: E731
    else:
        base = [torch.randn(B, H, T, D, generator=g) * scale for _ in range(3)]
        if density < 1.0:
            base = [t * (torch.rand(t.shape, generator=g) < density) for t in base]
            base[0][:, :, ::5] = 0.0
        views = lambda ts: list(ts)  # noqa: E731
    sink = torch.randn(H, generator=g) * 2
    gy = torch.randn(B, H, T, D, generator=g)
    return base, views, sink, gy


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    T=st.integers(1, 70),
    D=st.sampled_from([8, 16, 32, 64, 12]),
    with_sink=st.booleans(),
    layout=st.sampled_from(["model", "contiguous"]),
    scale=st.sampled_from([1.0, 4.0]),
    density=st.sampled_from([1.0, 0.25, 0.05]),
)
def test_matches_the_float64_reference_fwd_and_bwd(
    seed, B, H, T, D, with_sink, layout, scale, density
) -> None:
    base, views, sink, gy = _inputs(seed, B, H, T, D, layout, scale, density)
    ref_in = [t.double().requires_grad_(True) for t in base]
    ref_sink = sink.double().requires_grad_(True) if with_sink else None
    want = reference(*views(ref_in), ref_sink)
    want_g = torch.autograd.grad(want, ref_in + ([ref_sink] if with_sink else []), gy.double())
    for name in BACKENDS:
        os.environ[ENV] = name
        inp = [t.clone().requires_grad_(True) for t in base]
        s = sink.clone().requires_grad_(True) if with_sink else None
        y = causal_attention(*views(inp), s)
        got_g = torch.autograd.grad(y, inp + ([s] if with_sink else []), gy)
        for a, b in zip([y, *got_g], [want, *want_g], strict=True):
            # float32 rounding relative to the tensor's scale: 1e-5 (x4 for the peaked
            # softmaxes of scale 4, whose gradients reach ~50 and lose more digits)
            err = (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
            assert err < 1e-5 * scale, (name, err)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled kernels not built")
def test_the_kernel_runs_for_narrow_float32_heads_only() -> None:
    os.environ[ENV] = "cpp"
    q = torch.randn(1, 2, 5, 16)
    assert _NarrowAttention.available(q, q, q)
    assert not _NarrowAttention.available(q[..., :12], q[..., :12], q[..., :12])
    assert not _NarrowAttention.available(q.double(), q.double(), q.double())
    os.environ[ENV] = "torch"
    assert not _NarrowAttention.available(q, q, q)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled kernels not built")
def test_extreme_scores_stay_finite_and_match() -> None:
    """Scores far beyond exp's float32 range (|s| ~ 1e3): the max-subtracted softmax of the
    kernel stays finite and equal to the reference."""
    os.environ[ENV] = "cpp"
    base, views, sink, _ = _inputs(3, 2, 3, 33, 16, "model", 30.0)
    y = causal_attention(*views(base), sink)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), reference(*views(base), sink), rtol=1e-5, atol=1e-3)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled kernels not built")
def test_sparse_queries_with_an_infinite_key_propagate_like_the_dense_product() -> None:
    """Scoring from the queries' nonzero channels skips 0 * k terms; with an infinite key
    those are NaN in the dense product, so such heads take the dense path and agree with
    torch's kernel (NaN where it has NaN)."""
    base, views, sink, _ = _inputs(5, 1, 2, 20, 16, "contiguous", 1.0, 0.25)
    base[1][0, 1, 3, 7] = float("inf")
    os.environ[ENV] = "cpp"
    got = causal_attention(*views(base), sink)
    os.environ[ENV] = "torch"
    want = causal_attention(*views(base), sink)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled kernels not built")
@pytest.mark.parametrize("T, D", [(13, 16), (12, 8), (16, 16)])
def test_an_infinite_key_leaves_other_gradients_finite_like_torch(T: int, D: int) -> None:
    """The last tile's padding lanes (T not a multiple of 8) score 0 * inf = NaN against an
    infinite key; that must not reach dK or dV, whose NaNs match torch's."""
    g = torch.Generator().manual_seed(2)
    q = torch.rand(1, 1, T, D, generator=g) + 0.1
    k, v = torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    k[0, 0, 2, 0] = -float("inf")
    gy = torch.randn(1, 1, T, D, generator=g)
    grads = {}
    for name in ("cpp", "torch"):
        os.environ[ENV] = name
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        causal_attention(*ins, None).backward(gy)
        grads[name] = [t.grad for t in ins[1:]]
    for got, want in zip(grads["cpp"], grads["torch"], strict=True):
        assert torch.equal(got.isnan(), want.isnan())
