"""``y = x W^T + b`` at the cost of W's nonzeros, forward and backward.

Forward and ``dx = dy W`` run the CSR kernel (``dx`` on W^T's CSR). The weight gradient has
two modes, because the top-k projection lets weights regrow and that needs dense gradient
information:

- ``dense`` (exact): ``dW = dy^T x`` as a dense matrix product, identical to ``F.linear``'s;
  it costs a third of a dense layer's work.
- ``support``: ``dW`` only at W's nonzeros (an SDDMM, O(nnz * tokens)); zeros elsewhere. The
  trainer's fast mode uses it on most steps and a dense step every R steps to let weights regrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sparsecircuits.kernels._lib import lib
from sparsecircuits.kernels.crossover import sparse_below
from sparsecircuits.kernels.csr import CSRPattern, build_pattern

GradMode = Literal["dense", "support"]
_SDDMM_CHUNK = 1 << 16  # nonzeros per chunk of the torch fallback's gather


def _cpp(*ts: torch.Tensor) -> bool:
    return lib() is not None and all(t.device.type == "cpu" for t in ts)


def spmm(
    crow: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """x (N, in) @ W^T (+ bias) for W in CSR (out_features rows) -> (N, out_features)."""
    N, n_in = x.shape
    if _cpp(x):
        x = x.contiguous()
        y = torch.empty(N, out_features, dtype=x.dtype)
        b = bias.contiguous() if bias is not None else None
        lib().sc_spmm(
            N, n_in, out_features, crow.data_ptr(), col.data_ptr(), val.data_ptr(),
            x.data_ptr(), b.data_ptr() if b is not None else 0, y.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return y
    if col.numel() == 0:
        y = x.new_zeros(N, out_features)
    else:  # stock torch SpMM (PERF.md §1, e1): each output row is a weighted bag of x^T rows
        yt = F.embedding_bag(
            col.long(), x.t().contiguous(), crow[:-1], mode="sum", per_sample_weights=val
        )
        y = yt.t().contiguous()
    return y + bias if bias is not None else y


def sddmm(pattern: CSRPattern, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weight gradient at the nonzeros: dval[j] = sum_n dy[n, row_j] * x[n, col_j] -> (nnz,)."""
    N = x.shape[0]
    if _cpp(x, dy):
        dy, x = dy.contiguous(), x.contiguous()
        dval = torch.empty(pattern.nnz, dtype=x.dtype)
        lib().sc_sddmm(
            N, pattern.cols, pattern.rows, pattern.crow.data_ptr(), pattern.col.data_ptr(),
            dy.data_ptr(), x.data_ptr(), dval.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return dval
    rows, cols = pattern.row_index().to(x.device), pattern.col.long().to(x.device)
    parts = [
        (dy[:, rows[i : i + _SDDMM_CHUNK]] * x[:, cols[i : i + _SDDMM_CHUNK]]).sum(0)
        for i in range(0, pattern.nnz, _SDDMM_CHUNK)
    ]
    return torch.cat(parts) if parts else x.new_zeros(0)


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern: CSRPattern, grad_mode: GradMode):  # type: ignore[override]
        val = weight.detach().reshape(-1)[pattern.flat]
        ctx.save_for_backward(x, weight, val)
        ctx.pattern, ctx.grad_mode, ctx.has_bias = pattern, grad_mode, bias is not None
        return spmm(pattern.crow, pattern.col, val, x, bias, pattern.rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, val = ctx.saved_tensors
        p: CSRPattern = ctx.pattern
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = spmm(p.crow_t, p.col_t, val[p.perm].contiguous(), dy, None, p.cols)
        if ctx.needs_input_grad[1]:
            if ctx.grad_mode == "dense":
                dw = dy.t().mm(x)
            else:
                dw = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
                dw[p.flat] = sddmm(p, dy, x)
                dw = dw.view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db, None, None


@dataclass
class LinearKernelState:
    """Per-layer cache of the weight's density and CSR pattern, valid while the weight is
    unchanged (same storage and version counter)."""

    grad_mode: GradMode = "dense"
    pattern: CSRPattern | None = None
    density: float = 1.0
    key: tuple[int, int] | None = None  # (data_ptr, _version) of the cached weight
    pattern_key: tuple[int, int] | None = None

    def density_of(self, weight: torch.Tensor) -> float:
        key = (weight.data_ptr(), weight._version)
        if self.key != key:
            self.key = key
            self.density = int(torch.count_nonzero(weight.detach())) / max(1, weight.numel())
        return self.density

    def values_changed(self, weight: torch.Tensor) -> None:
        """The weight changed only on its cached pattern (no new nonzeros): keep the pattern
        and density instead of rescanning. A pattern that is a superset of the nonzeros stays
        correct (its extra entries hold 0)."""
        key = (weight.data_ptr(), weight._version)
        if self.pattern is not None and self.key == self.pattern_key:
            self.pattern_key = key
        if self.key is not None:
            self.key = key

    def pattern_for(self, weight: torch.Tensor) -> CSRPattern:
        key = (weight.data_ptr(), weight._version)
        if self.pattern is None or self.pattern_key != key:
            self.pattern, self.pattern_key = build_pattern(weight), key
        return self.pattern


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: LinearKernelState,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the CSR kernels when the weight's density is
    below the measured crossover for its shape (CPU float32; elsewhere plain ``F.linear``).
    x (..., in) -> (..., out)."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or torch.is_autocast_enabled()
    ):
        return F.linear(x, weight, bias)
    out_f, in_f = weight.shape
    limit = sparse_below(out_f, in_f)
    if limit <= 0.0:
        return F.linear(x, weight, bias)
    if state.density_of(weight) >= limit:
        state.pattern = None  # a dense weight: drop a stale pattern
        return F.linear(x, weight, bias)
    pattern = state.pattern_for(weight)
    lead = x.shape[:-1]
    y = _SparseLinear.apply(x.reshape(-1, in_f), weight, bias, pattern, state.grad_mode)
    return y.view(*lead, out_f)
