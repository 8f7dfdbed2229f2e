"""Support-indexed optimizer arithmetic against torch, on both backends."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecircuits.kernels import adamw_at_, sumsq, support_index
from sparsecircuits.kernels._lib import ENV, library_path

BACKENDS = ["torch"] + (["cpp"] if library_path() is not None else [])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=st.sampled_from([(0,), (1,), (7, 3), (300, 301)]),
    density=st.sampled_from([0.0, 0.02, 0.5, 1.0]),
)
def test_sumsq_matches_float64(seed, shape, density) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    mask = torch.rand(*shape, generator=g) < density
    idx = support_index(mask)
    for name in BACKENDS:
        os.environ[ENV] = name
        whole, part = sumsq(x), sumsq(x, idx)
        assert whole == pytest.approx(float(x.double().pow(2).sum()), rel=1e-12, abs=1e-12)
        assert part == pytest.approx(float(x.double()[mask].pow(2).sum()), rel=1e-12, abs=1e-12)


def test_sumsq_refuses_a_narrow_index_and_reads_strided_indices() -> None:
    with pytest.raises(TypeError, match="int64"):
        sumsq(torch.ones(4), torch.tensor([0, 1], dtype=torch.int32))
    g = torch.randn(300_000, generator=torch.Generator().manual_seed(0))
    idx = torch.arange(300_000).repeat_interleave(2)[::2]  # a strided view of 0, 1, 2, ...
    for name in BACKENDS:
        os.environ[ENV] = name
        for _ in range(3):  # the compiled path must keep its contiguous copy alive
            assert sumsq(g, idx) == pytest.approx(float(g.double().pow(2).sum()), rel=1e-12)


def test_adamw_at_refuses_a_mask_for_an_index() -> None:
    w = torch.zeros(5)
    with pytest.raises(TypeError, match="int64"):
        adamw_at_(w, w.clone(), w.clone(), w.clone(), torch.ones(5, dtype=torch.bool), step=1,
                  lr=0.1, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8)  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.sampled_from([1, 17, 70_000]),  # the last runs the threaded path
    steps=st.integers(1, 4),
    scale=st.sampled_from([1.0, 0.25]),
    wd=st.sampled_from([0.0, 0.1]),
)
def test_adamw_at_matches_torch_adamw_on_the_support(seed, n, steps, scale, wd) -> None:
    """On the support: torch's AdamW with the gradient pre-scaled. Off it: nothing moves."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.3
    grads = [torch.randn(n, generator=g) for _ in range(steps)]
    idx = support_index(mask)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd,
                            foreach=False)  # fmt: skip
    for gr in grads:
        ref.grad = gr * scale
        opt.step()
    st_ = opt.state[ref]
    for name in BACKENDS:
        os.environ[ENV] = name
        w, m, v = w0.clone(), torch.zeros(n), torch.zeros(n)
        for i, gr in enumerate(grads, start=1):
            adamw_at_(w, m, v, gr, idx, step=i, lr=0.01, weight_decay=wd, beta1=0.9,
                      beta2=0.95, eps=1e-8, grad_scale=scale)  # fmt: skip
        torch.testing.assert_close(w[mask], ref.detach()[mask], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m[mask], st_["exp_avg"][mask], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v[mask], st_["exp_avg_sq"][mask], rtol=1e-5, atol=1e-9)
        assert torch.equal(w[~mask], w0[~mask]), name
        assert not m[~mask].any() and not v[~mask].any(), name


@pytest.mark.parametrize("n", [17, 70_000])  # the second runs the threaded path
def test_adamw_at_with_compact_moments_equals_dense_moments(n: int) -> None:
    """Moments (and the gradient) held as (nnz,) copies in the index's order give bitwise the
    dense-indexed results, on both backends; compact tensors of the wrong size are refused."""
    g = torch.Generator().manual_seed(n)
    w0 = torch.randn(n, generator=g)
    idx = support_index(torch.rand(n, generator=g) < 0.2)
    grads = [torch.randn(n, generator=g) for _ in range(3)]
    hp = dict(lr=0.01, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_scale=0.5)
    for name in BACKENDS:
        os.environ[ENV] = name
        w, m, v = w0.clone(), torch.zeros(n), torch.zeros(n)
        wc, mc, vc = w0.clone(), torch.zeros(idx.numel()), torch.zeros(idx.numel())
        wg, mg, vg = w0.clone(), torch.zeros(idx.numel()), torch.zeros(idx.numel())
        for i, gr in enumerate(grads, start=1):
            adamw_at_(w, m, v, gr, idx, step=i, **hp)
            adamw_at_(wc, mc, vc, gr, idx, step=i, compact=True, **hp)
            adamw_at_(wg, mg, vg, gr[idx], idx, step=i, compact=True, compact_grad=True, **hp)
        assert torch.equal(w, wc) and torch.equal(w, wg), name
        assert torch.equal(m[idx], mc) and torch.equal(v[idx], vc), name
        assert torch.equal(mg, mc) and torch.equal(vg, vc), name
    with pytest.raises(ValueError, match="compact moments"):
        adamw_at_(w, m, v, grads[0], idx, step=1, compact=True, **hp)
    with pytest.raises(ValueError, match="compact gradient"):
        adamw_at_(w, mc, vc, grads[0], idx, step=1, compact=True, compact_grad=True, **hp)
