"""The two-pass cross-entropy against F.cross_entropy in float64, on both backends."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecircuits.errors import InputError
from sparsecircuits.kernels import add_logit_tables, cross_entropy
from sparsecircuits.kernels._lib import ENV, library_path

BACKENDS = ["torch"] + (["cpp"] if library_path() is not None else [])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 40),
    vocab=st.integers(1, 300),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    ignored=st.floats(0.0, 0.5),
)
def test_matches_torch_in_loss_and_gradient(seed, rows, vocab, scale, ignored) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[torch.rand(rows, generator=g) < ignored] = -1
    t[0] = min(vocab - 1, 3)  # at least one counted row
    ref = x.double().requires_grad_(True)
    want = F.cross_entropy(ref, t, ignore_index=-1)
    want.backward(torch.tensor(2.0, dtype=torch.float64))
    for name in BACKENDS:
        os.environ[ENV] = name
        xx = x.clone().requires_grad_(True)
        loss = cross_entropy(xx, t)
        loss.backward(torch.tensor(2.0))
        assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item())), name
        err = (xx.grad.double() - ref.grad).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.grad.abs().max().item()), (name, err)


@pytest.mark.parametrize("name", BACKENDS)
def test_gradient_for_unit_upstream_and_repeated_backwards(name: str) -> None:
    """The gradient the forward prepares (upstream 1) is right, is handed out once, and a
    second backward through a retained graph recomputes it instead of reusing a buffer the
    first caller may have modified."""
    os.environ[ENV] = name
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 70, generator=g) * 4
    t = torch.randint(0, 70, (33,), generator=g)
    t[5] = -1
    ref = x.double().requires_grad_(True)
    F.cross_entropy(ref, t, ignore_index=-1).backward()
    xx = x.clone().requires_grad_(True)
    loss = cross_entropy(xx, t)
    loss.backward(retain_graph=True)
    first = xx.grad.clone()
    torch.testing.assert_close(first.double(), ref.grad, rtol=1e-5, atol=1e-7)
    xx.grad.mul_(100.0)  # a caller scribbling on the gradient it was given
    xx.grad = None
    loss.backward()
    torch.testing.assert_close(xx.grad, first, rtol=1e-6, atol=1e-8)
    with torch.no_grad():  # no gradient wanted: nothing prepared
        assert torch.isclose(cross_entropy(x, t), loss.detach())


@pytest.mark.parametrize("name", BACKENDS)
def test_all_ignored_gives_nan_and_bad_targets_are_refused(name: str) -> None:
    os.environ[ENV] = name
    x = torch.randn(3, 5)
    assert torch.isnan(cross_entropy(x, torch.full((3,), -1)))
    if name == "cpp":
        with pytest.raises(InputError, match=r"targets must be in \[-1, 5\)"):
            cross_entropy(x, torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("parts", ["both", "bias", "table", "learnable"])
def test_add_logit_tables_matches_torch_with_gradients(name: str, parts: str) -> None:
    os.environ[ENV] = name
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 7, generator=g)
    bias = torch.randn(7, generator=g) if parts in ("both", "bias") else None
    table = torch.randn(11, 7, generator=g) if parts != "bias" else None
    if parts == "learnable":
        table.requires_grad_(True)
    idx = torch.randint(0, 11, (2, 5), generator=g)
    gy = torch.randn(2, 5, 7, generator=g)
    x = base.clone().requires_grad_(True)
    logits = x * 1.0  # a non-leaf, like the unembedding's output
    got = add_logit_tables(logits, bias, table, idx)
    want = base + (0 if bias is None else bias) + (0 if table is None else table.detach()[idx])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got.backward(gy)
    torch.testing.assert_close(x.grad, gy)
    if parts == "learnable":
        want_t = torch.zeros(11, 7).index_add_(0, idx.reshape(-1), gy.reshape(-1, 7))
        torch.testing.assert_close(table.grad, want_t)
