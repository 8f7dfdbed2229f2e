"""A sparse product followed by AbsTopK (or GELU, then AbsTopK) on column segments of its output,
as one autograd node: ``c_attn`` -> q, k, v; ``c_fc`` -> GELU -> AbsTopK; ``c_proj`` -> AbsTopK.

The forward is exactly the unfused ops' (the CSR product, torch's GELU, the AbsTopK kernel).
The backward is where fusing pays: unfused, each AbsTopK backward reads its upstream gradient
and mask and writes the masked gradient, the q/k/v split's backward concatenates three of them,
and the product's backward reads the result again. Here the support-mode product backward
(``fused_support_backward``) applies the masks (and GELU's derivative) while it loads each tile
of the upstream gradients: one read of each, no intermediate. Results are bitwise the unfused
ones.
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
    GradMode,
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


class _SparseLinearTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern: CSRPattern, grad_mode: GradMode, segments):  # type: ignore[override]
        val = gather(weight.detach(), pattern.flat)
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
        ctx.pattern, ctx.grad_mode, ctx.has_bias = pattern, grad_mode, bias is not None
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
    not apply (the product takes the dense path, no compiled kernels, no gradient to take, a
    segment keeps every entry): the caller then runs the ops one by one."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None  # inference: the in-place AbsTopK after the plain product is cheaper
    if lib() is None or sum(s.width for s in segments) != weight.shape[0]:
        return None
    if any(not 0 < s.k < s.width for s in segments):
        return None
    pattern = sparse_pattern(x, weight, bias, state)
    if pattern is None:
        return None
    lead = x.shape[:-1]
    outs = _SparseLinearTopK.apply(
        x.reshape(-1, x.shape[-1]), weight, bias, pattern, state.grad_mode, segments
    )
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)
