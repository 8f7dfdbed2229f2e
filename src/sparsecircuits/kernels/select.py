"""Exact top-k selection without a sort: AbsTopK on activations, top-k projection of weights.

Both keep the k entries of largest magnitude. Where several entries tie in |x| at the
threshold, the lowest index wins (a stable top-k). The kept *values* are then always the ones
``torch.topk`` + scatter would give, except when the tie is between +a and -a, where torch's
choice is unspecified; zeros tied at the threshold give identical outputs either way.
The compiled path (radix select on the float bits, ``csrc/select.cpp``) and the torch
fallback implement the same rule, so they return identical tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsecircuits.kernels._lib import lib, threads_for

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}  # fmt: skip
PROTECTED = 2**63 - 1  # above every magnitude key but float64 NaNs (the row floor)


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| as integers ordered like |x| (int64), the compiled kernels' keys: the float's bits
    without the sign. NaN sorts above inf, and -0.0 equals +0.0, exactly as in C++."""
    bits = x.contiguous().view(_INT_VIEW[x.dtype]).to(torch.int64)
    width = 8 * x.element_size()
    return bits & ((1 << (width - 1)) - 1) if width < 64 else bits & (2**63 - 1)


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest ``score`` along the last dim, ties to the lowest index
    (pure torch; the reference the compiled kernels match). score (..., n) -> (..., n); use
    integer ``magnitude_keys`` for magnitudes so that NaN and inf order as in C++."""
    n = score.shape[-1]
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thr = score.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = score > thr
    tie = score == thr
    need = k - above.sum(dim=-1, keepdim=True)
    return above | (tie & (tie.cumsum(dim=-1) <= need))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, n) with unit column stride, without copying when possible."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


def _use_cpp(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and lib() is not None


def abstopk_forward(
    x: torch.Tensor, k: int, *, with_mask: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, mask): y keeps the k largest |x| of each last-dim row, zeros elsewhere; mask (bool)
    marks them, or is None with ``with_mask=False`` (no gradient to take)."""
    n = x.shape[-1]
    if not _use_cpp(x) or x.numel() == 0:
        mask = topk_mask(magnitude_keys(x), k)
        return torch.where(mask, x, 0.0), mask if with_mask else None
    x2 = as_rows(x)
    y = torch.empty(x.shape, dtype=x.dtype)
    mask = torch.empty(x.shape, dtype=torch.bool) if with_mask else None
    lib().sc_abstopk(
        x2.data_ptr(),
        x2.stride(0),
        y.data_ptr(),
        n,
        None if mask is None else mask.data_ptr(),
        x2.shape[0],
        n,
        max(0, min(k, n)),
        torch.get_num_threads(),
    )
    return y, mask


class _AbsTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        y, mask = abstopk_forward(x, k)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return masked_grad(gy, mask), None


def masked_grad(gy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``gy`` where ``mask`` (bool, same shape) is set, 0 elsewhere: the AbsTopK backward, in
    one pass over memory on the compiled path (``torch.where`` takes ~3x longer here)."""
    if not _use_cpp(gy) or gy.numel() == 0 or not mask.is_contiguous():
        return torch.where(mask, gy, 0.0)
    g2 = as_rows(gy)
    out = torch.empty(gy.shape, dtype=gy.dtype)
    lib().sc_mask_grad(
        g2.data_ptr(), g2.stride(0), mask.data_ptr(), out.data_ptr(), g2.shape[0], g2.shape[1],
        torch.get_num_threads(),
    )  # fmt: skip
    return out


class _GeluAbsTopK(torch.autograd.Function):
    """AbsTopK(GELU(x)) with one fused backward pass: GELU's derivative, the kept-entry mask
    and the incoming gradient in one read of each (torch would run two passes and write an
    intermediate). The forward is torch's GELU, so outputs are those of the unfused pair."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        y, mask = abstopk_forward(F.gelu(x), k)
        ctx.save_for_backward(x, mask)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        x, mask = ctx.saved_tensors
        return gelu_abstopk_grad(gy, x, mask), None


def gelu_abstopk_grad(gy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The backward of AbsTopK(GELU(x)): ``gy * GELU'(x)`` where ``mask`` (the kept entries,
    bool) is set, 0 elsewhere, in one pass on the compiled path. Same shapes in and out."""
    if not _use_cpp(gy) or gy.numel() == 0 or not (x.is_contiguous() and mask.is_contiguous()):
        return torch.where(mask, torch.ops.aten.gelu_backward(gy, x), 0.0)
    g2 = as_rows(gy)
    out = torch.empty(gy.shape, dtype=gy.dtype)
    lib().sc_gelu_topk_grad(
        x.data_ptr(), g2.data_ptr(), g2.stride(0), mask.data_ptr(), out.data_ptr(),
        g2.shape[0], g2.shape[1], torch.get_num_threads(),
    )  # fmt: skip
    return out


def abstopk_(x: torch.Tensor, k: int) -> torch.Tensor:
    """In place, without gradients: zero all but the ``k`` largest |x| of each last-dim row
    of ``x`` (which may be a view with unit column stride); returns x. For a temporary the
    caller owns (the model's forward under no_grad): no output buffer to fill."""
    n = x.shape[-1]
    if k >= n:
        return x
    try:
        x2 = x.view(-1, n)  # rows of a view with unit column stride, without a copy
    except RuntimeError:
        x2 = None
    overlapping = x2 is not None and x2.shape[0] > 1 and x2.stride(0) < n  # e.g. expanded
    if x2 is None or overlapping or not _use_cpp(x) or x.numel() == 0 or x2.stride(-1) != 1:
        return x.copy_(abstopk_forward(x, k, with_mask=False)[0])
    lib().sc_abstopk(
        x2.data_ptr(), x2.stride(0), x2.data_ptr(), x2.stride(0), None, x2.shape[0], n,
        max(0, k), threads_for(x2.shape[0] * n),
    )  # fmt: skip
    return x


def _no_grad(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


def gelu_abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    """``abstopk(F.gelu(x), k)`` (exact GELU) with a fused backward."""
    if k >= x.shape[-1]:
        return F.gelu(x)
    if _no_grad(x):
        return abstopk_(F.gelu(x), k)  # GELU's output is ours to overwrite
    return _GeluAbsTopK.apply(x, k)


def abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` entries of largest |x| along the last dim, zero the rest (same shape).
    The gradient flows to exactly the kept entries."""
    if k >= x.shape[-1]:
        return x
    if _no_grad(x):  # inference: no mask to keep
        return abstopk_forward(x, k, with_mask=False)[0]
    return _AbsTopK.apply(x, k)


@torch.no_grad()
def project_topk_(w: torch.Tensor, k: int, *, floor: int) -> torch.Tensor:
    """Zero all but ``k`` entries of the 2-D (or 1-D) ``w`` in place: each row's ``floor``
    largest |w| first, then the largest remaining |w| overall; returns the kept mask."""
    if k >= w.numel():
        return torch.ones_like(w, dtype=torch.bool)
    if k <= 0:
        w.zero_()
        return torch.zeros_like(w, dtype=torch.bool)
    w2 = w if w.dim() == 2 else w.view(1, -1)
    floor = max(0, min(floor, k // w2.shape[0])) if w.dim() == 2 else 0
    if _use_cpp(w) and w.is_contiguous():
        mask = torch.empty_like(w, dtype=torch.bool)
        lib().sc_project_topk(
            w.data_ptr(), mask.data_ptr(), w2.shape[0], w2.shape[1], k, floor,
            torch.get_num_threads(),
        )  # fmt: skip
        torch.autograd.graph.increment_version(w)  # written behind autograd's back
        return mask
    score = magnitude_keys(w2)
    if floor > 0:
        score[topk_mask(score, floor)] = PROTECTED
    mask = topk_mask(score.view(1, -1), k).view_as(w)
    w.masked_fill_(~mask, 0.0)
    return mask
