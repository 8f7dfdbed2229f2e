"""A sparse product followed by AbsTopK (or GELU, then AbsTopK) on column segments of its output,
as one autograd node: ``c_attn`` -> q, k, v; ``c_fc`` -> GELU -> AbsTopK; ``c_proj`` -> AbsTopK.

The forward gives exactly the unfused ops' results (the CSR product, torch's GELU, the AbsTopK
kernel). Without a GELU it is one compiled pass (``sc_spmm_topk``, also used for inference):
each tile's output rows are selected while in cache, so the product's output is never
written out and read back. The backward is where fusing pays most: unfused, each AbsTopK
backward reads its upstream gradient and mask and writes the masked gradient, the q/k/v
split's backward concatenates three of them, and the product's backward reads the result
again. Here the support-mode product backward (``fused_support_backward``) applies the masks
(and GELU's derivative) while it loads each tile of the upstream gradients: one read of each,
no intermediate. Results are bitwise the unfused ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sparsecircuits.kernels._lib import lib
from sparsecircuits.kernels.csr import CSRPattern, gather
from sparsecircuits.kernels.linear import (
    DySegment,
    LinearKernelState,
    linear_backward,
    sparse_pattern,
    spmm,
)
from sparsecircuits.kernels.select import abstopk_forward


@dataclass(frozen=True)
class Segment:
    """``width`` output columns whose ``k`` largest |values| per row are kept, after a GELU
    when ``gelu``."""

    width: int
    k: int
    gelu: bool = False


def spmm_topk(
    pattern: CSRPattern,
    val: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    segments: tuple[Segment, ...],
    *,
    with_mask: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The product ``x W^T (+ bias)`` (W: ``pattern`` with values ``val``; x (N, in) float32
    contiguous) and each segment's AbsTopK (no GELU) in one compiled pass: each tile's output
    rows are selected while in cache, so the product's output is never written. Returns the
    segments' outputs (N, width) and masks (bool, or None without ``with_mask``); bitwise
    ``spmm`` then ``abstopk_forward``."""
    n = x.shape[0]
    b = bias.contiguous() if bias is not None else None  # alive through the call
    outs = [torch.empty(n, s.width, dtype=x.dtype) for s in segments]
    masks = [torch.empty(n, s.width, dtype=torch.bool) if with_mask else None for s in segments]
    table = (
        torch.tensor(
            [
                [s.width, s.k, o.data_ptr(), m.data_ptr() if m is not None else 0]
                for s, o, m in zip(segments, outs, masks, strict=True)
            ],
            dtype=torch.int64,
        )
        .t()
        .contiguous()
    )  # (4, nseg): widths, k, outputs, masks
    lib().sc_spmm_topk(
        n, pattern.cols, pattern.rows, pattern.crow.data_ptr(), pattern.col.data_ptr(),
        val.data_ptr(), x.data_ptr(), b.data_ptr() if b is not None else 0,
        len(segments), *(r.data_ptr() for r in table), _threads(n),
    )  # fmt: skip
    return outs, masks


def _threads(rows: int) -> int:
    """``spmm_topk`` splits the work by tiles of 32 tokens only: all threads from one tile per
    thread on; a single tile (decoding) runs on one thread."""
    return torch.get_num_threads() if rows >= 32 * torch.get_num_threads() else 1


def _fused_forward_applies(x: torch.Tensor, bias: torch.Tensor | None, segments) -> bool:
    """Whether ``spmm_topk`` takes these: no GELU segment (torch's GELU stays torch's),
    float32 CPU tensors (the caller's pattern guarantees the compiled library), and either a
    tile of 32 tokens per thread at least or a single tile on one thread (between the two,
    the plain product, which splits few tokens' rows over the threads, is faster)."""
    rows = x.numel() // max(1, x.shape[-1])
    return (
        not any(s.gelu for s in segments)
        and (rows >= 32 * torch.get_num_threads() or rows <= 32)
        and all(
            t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, bias) if t is not None
        )
    )


class _SparseLinearTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern: CSRPattern, state: LinearKernelState, segments):  # type: ignore[override]
        val = gather(weight.detach(), pattern.flat)
        if _fused_forward_applies(x, bias, segments):
            outs, masks = spmm_topk(pattern, val, x.contiguous(), bias, segments, with_mask=True)
            pre = [None] * len(segments)
        else:
            y = spmm(pattern.crow, pattern.col, val, x, bias, pattern.rows)  # (N, out)
            outs, masks, pre = [], [], []
            c0 = 0
            for seg in segments:
                ys = y[:, c0 : c0 + seg.width]
                c0 += seg.width
                out, mask = abstopk_forward(F.gelu(ys) if seg.gelu else ys, seg.k)
                outs.append(out)
                masks.append(mask)
                pre.append(ys if seg.gelu else None)
        ctx.save_for_backward(x, weight, val, *masks, *(h for h in pre if h is not None))
        ctx.pattern, ctx.has_bias = pattern, bias is not None
        ctx.grad_mode, ctx.regrowth, ctx.state = state.grad_mode, state.regrowth, state
        ctx.gelu = [seg.gelu for seg in segments]
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        n = len(grads)
        masks = ctx.saved_tensors[3 : 3 + n]
        pre = iter(ctx.saved_tensors[3 + n :])
        dy = [
            DySegment(
                g if g is not None else torch.zeros_like(m, dtype=torch.float32),
                m,
                next(pre) if gelu else None,
            )
            for g, m, gelu in zip(grads, masks, ctx.gelu, strict=True)
        ]
        return *linear_backward(ctx, dy), None, None, None


def sparse_linear_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: LinearKernelState,
    segments: tuple[Segment, ...],
) -> tuple[torch.Tensor, ...] | None:
    """``AbsTopK`` (after ``GELU`` where asked) of each column segment of ``F.linear(x, weight,
    bias)``: x (..., in) -> one (..., width) tensor per segment; None where the fused node does
    not apply (the product takes the dense path, no compiled kernels, a segment keeps every
    entry, or no gradient to take and a GELU): the caller then runs the ops one by one."""
    if lib() is None or sum(s.width for s in segments) != weight.shape[0]:
        return None
    if any(not 0 < s.k < s.width for s in segments):
        return None
    lead = x.shape[:-1]
    wants_grad = any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not (torch.is_grad_enabled() and wants_grad):
        # inference: the fused forward without masks where it applies; elsewhere the plain
        # product and the in-place AbsTopK (the caller's)
        if not _fused_forward_applies(x, bias, segments):
            return None
        pattern = sparse_pattern(x, weight, bias, state)
        if pattern is None:
            return None
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        val = state.values_for(weight, pattern)
        outs, _ = spmm_topk(pattern, val, x2, bias.detach() if bias is not None else None,
                            segments, with_mask=False)  # fmt: skip
        return tuple(o.view(*lead, o.shape[-1]) for o in outs)
    pattern = sparse_pattern(x, weight, bias, state)
    if pattern is None:
        return None
    outs = _SparseLinearTopK.apply(
        x.reshape(-1, x.shape[-1]), weight, bias, pattern, state, segments
    )
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)
