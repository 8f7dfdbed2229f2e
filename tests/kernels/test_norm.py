"""The fused RMSNorm against F.rms_norm in float64, forward and backward, on both backends."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecircuits.kernels import rms_norm
from sparsecircuits.kernels._lib import ENV, library_path
from sparsecircuits.model.layers import RMSNorm

BACKENDS = ["torch"] + (["cpp"] if library_path() is not None else [])


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    lead=st.sampled_from([(1,), (7,), (2, 5)]),
    n=st.integers(1, 70),
    eps=st.sampled_from([None, 1e-5]),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    strided=st.booleans(),
)
def test_matches_float64_reference(seed, lead, n, eps, scale, strided) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=g) * scale
    w = torch.randn(n, generator=g)
    gy = torch.randn(n, *lead, generator=g).movedim(0, -1) if strided else torch.randn_like(x)
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    want = F.rms_norm(xr, (n,), wr, torch.finfo(torch.float32).eps if eps is None else eps)
    want.backward(gy.double())
    for name in BACKENDS:
        os.environ[ENV] = name
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = rms_norm(xx, ww, eps)
        y.backward(gy)
        for got, ref in ((y, want), (xx.grad, xr.grad), (ww.grad, wr.grad)):
            assert _err(got, ref) < 1e-5, (name, _err(got, ref))


def test_the_module_is_an_nn_rmsnorm_with_its_eps() -> None:
    m = RMSNorm(6)
    assert isinstance(m, torch.nn.RMSNorm) and list(dict(m.named_parameters())) == ["weight"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), torch.nn.RMSNorm(6)(x))
