"""``y = x W^T + b`` at the cost of W's nonzeros, forward and backward.

Forward and ``dx = dy W`` run the CSR kernel (``dx`` on W^T's CSR). The weight gradient has
two modes, because the top-k projection lets weights regrow and that needs dense gradient
information:

- ``dense`` (exact): ``dW = dy^T x`` as a dense matrix product, identical to ``F.linear``'s;
  it costs a third of a dense layer's work.
- ``support``: ``dW`` only at W's nonzeros (an SDDMM, O(nnz * tokens)); zeros elsewhere. The
  trainer's fast mode uses it on most steps and a dense step every R steps to let weights regrow.
- ``support_sparse``: ``support`` with the gradient returned as a sparse COO tensor (the
  nonzeros' values only), for a consumer that steps on the support only (the trainer's
  support AdamW): no dense zero-filled gradient, no scattered writes into one.
- ``regrow``: the fast mode's dense step with a cheaper product. Off the support ``dW`` comes
  from a bfloat16 product (float32 accumulation, ~3e-3 relative error) on CPUs with native
  bfloat16 dot products, where it runs ~2x faster; on the support it is the exact float32
  SDDMM, as in ``support`` steps. The off-support part feeds the projection's choice of
  regrowing weights, that step's gradient-RMS factor and support share, and the AdamW moments
  of weights that are zero now, all perturbed by ~3e-3. Elsewhere it is ``dense``.
  ``Regrowth`` says which product (bfloat16 or float32) and how many tokens it reads: with
  ``share`` < 1 only the first ``share`` of the rows, scaled up by 1 / share (an unbiased
  estimate of the off-support gradient, at ``share`` of the product's cost).
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sparsecircuits.kernels._lib import cpu_flags, lib, threads_for
from sparsecircuits.kernels.crossover import sparse_below
from sparsecircuits.kernels.csr import CSRPattern, build_pattern, gather
from sparsecircuits.kernels.optim import sumsq
from sparsecircuits.kernels.select import as_rows, gelu_abstopk_grad, masked_grad

GradMode = Literal["dense", "support", "support_sparse", "regrow"]
_SDDMM_ELEMENTS = 1 << 24  # (tokens x nonzeros) per chunk of the torch fallback's gather


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so that a bfloat16
    product beats a float32 one; emulated bfloat16 is slower. torch's own probes where this
    torch has them (private helpers), else the CPU's flags."""
    probes = [
        getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if all(callable(f) for f in probes):
        return any(bool(f()) for f in probes)
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@dataclass(frozen=True)
class Regrowth:
    """How a ``regrow`` backward estimates the weight gradient off W's support: a bfloat16
    product where ``bf16`` and the CPU has native bfloat16 (else float32), over the first
    ``share`` (0 < share <= 1) of the sequences (``seq`` rows each), scaled up to all."""

    bf16: bool = True
    share: float = 1.0
    seq: int = 1  # rows per sequence: the subset and its two halves are whole sequences

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"Regrowth.share must be in (0, 1], got {self.share}")
        if self.seq < 1:
            raise ValueError(f"Regrowth.seq must be >= 1, got {self.seq}")

    def split(self, n: int) -> tuple[int, int]:
        """(m, h) for n rows: the estimate reads rows [0, m) as two halves [0, h), [h, m),
        each whole sequences (tokens of one sequence are correlated, and their positions
        differ in mean gradient): ceil(share * sequences), at least 2. (n, n): every row
        (share 1, or too few sequences to halve)."""
        seq = self.seq if n % self.seq == 0 else 1
        count = n // seq
        k = max(2, math.ceil(self.share * count - 1e-9))
        if self.share >= 1.0 or k >= count:
            return n, n
        return k * seq, k // 2 * seq


def regrow_weight_grad(
    pattern: CSRPattern, dy: torch.Tensor, x: torch.Tensor, regrowth: Regrowth = Regrowth()
) -> tuple[torch.Tensor, float]:
    """The ``regrow`` weight gradient: dy (N, out), x (N, in) -> (dW (out, in), excess):
    ``regrowth``'s estimate off W's support, the exact float32 SDDMM on it; ``excess`` as
    ``_off_support_dw`` gives it."""
    bf16 = regrowth.bf16 and native_bf16() and x.device.type == "cpu"
    if not bf16 and regrowth.share >= 1.0:
        return dy.t().mm(x), 0.0  # exact everywhere: no SDDMM needed
    dw, excess = _off_support_dw(dy, x, regrowth, pattern.flat)
    return sddmm(pattern, dy, x, dense_out=dw), excess


def _off_support_dw(
    dy: torch.Tensor, x: torch.Tensor, regrowth: Regrowth, support: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """``regrowth``'s estimate of dy^T x (out, in) from dy (N, out), x (N, in), and how much
    its squared norm off ``support`` (flat indices) exceeds, in expectation, that of the
    product over all N tokens (0.0 when it reads them all).

    From m < N tokens the estimate carries N / m times the token noise of the full product,
    and the gradient-RMS control (and the support shares it uses between regrowths) would
    read that noise as gradient. Two independent halves of the m tokens, of h and m - h,
    measure it: with a and b their per-token mean gradients, E[(a - b)^2] = v (1/h +
    1/(m - h)) for the per-token variance v, and the excess is v (1/m - 1/N) per entry."""
    n = dy.shape[0]
    m, h = regrowth.split(n)
    bf16 = regrowth.bf16 and native_bf16() and x.device.type == "cpu"
    prod = _bf16_dw if bf16 else _fp32_dw
    if m == n:
        return prod(dy, x), 0.0
    a, b = prod(dy[:h], x[:h]), prod(dy[h:m], x[h:m])
    diff = a.mul(n / h).sub_(b, alpha=n / (m - h))  # the halves' per-token mean gradients
    noise = sumsq(diff) - sumsq(diff, support.to(diff.device))
    excess = max(0.0, noise) * (1 / m - 1 / n) / (1 / h + 1 / (m - h))
    return a.add_(b).mul_(n / m), excess


def _fp32_dw(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy^T x (out, in) in float32."""
    return dy.t().mm(x)


def _bf16_dw(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy^T x (out, in) as a bfloat16 product with float32 accumulation."""
    return dy.to(torch.bfloat16).t().mm(x.to(torch.bfloat16)).float()


def _cpp(*ts: torch.Tensor | None) -> bool:
    """The compiled kernels apply: every tensor on the CPU in float32 (they read raw floats)."""
    return lib() is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in ts if t is not None
    )


def spmm(
    crow: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    *,
    x_col_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (N, in) @ W^T (+ bias) for W in CSR (out_features rows) -> (N, out_features).
    ``x_col_sum`` (in,): filled with x.sum(0) on the way (the bias gradient when x is dy)."""
    N, n_in = x.shape
    if _cpp(x, val, bias) and (x_col_sum is None or x_col_sum.is_contiguous()):
        x, val = x.contiguous(), val.contiguous()
        y = torch.empty(N, out_features, dtype=x.dtype)
        b = bias.contiguous() if bias is not None else None
        lib().sc_spmm(
            N, n_in, out_features, crow.data_ptr(), col.data_ptr(), val.data_ptr(),
            x.data_ptr(), b.data_ptr() if b is not None else 0, y.data_ptr(),
            x_col_sum.data_ptr() if x_col_sum is not None else 0,
            # column sums are per-thread partials: their rounding must not depend on the size
            torch.get_num_threads() if x_col_sum is not None else threads_for(N * col.numel()),
        )  # fmt: skip
        return y
    if x_col_sum is not None:
        x_col_sum.copy_(x.sum(0))
    if col.numel() == 0:
        y = x.new_zeros(N, out_features)
    else:  # stock torch SpMM (PERF.md §1, e1): each output row is a weighted bag of x^T rows
        yt = F.embedding_bag(
            col.long(), x.t().contiguous(), crow[:-1], mode="sum", per_sample_weights=val
        )
        y = yt.t().contiguous()
    return y + bias if bias is not None else y


def sddmm(
    pattern: CSRPattern, dy: torch.Tensor, x: torch.Tensor, *, dense_out: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight gradient at the nonzeros: dval[j] = sum_n dy[n, row_j] * x[n, col_j] -> (nnz,).
    With ``dense_out`` (a contiguous (rows, cols) tensor): written into it at the nonzeros'
    positions instead (overwriting them; the other entries are left as they are), and
    returned."""
    N = x.shape[0]
    if _cpp(x, dy) and (dense_out is None or dense_out.is_contiguous()):
        dy, x = dy.contiguous(), x.contiguous()
        dval = torch.empty(pattern.nnz, dtype=x.dtype) if dense_out is None else dense_out
        flat = pattern.flat.data_ptr() if dense_out is not None else 0
        lib().sc_sddmm(
            N, pattern.cols, pattern.rows, pattern.crow.data_ptr(), pattern.col.data_ptr(),
            dy.data_ptr(), x.data_ptr(), dval.data_ptr(), flat, torch.get_num_threads(),
        )  # fmt: skip
        return dval
    rows, cols = pattern.row_index().to(x.device), pattern.col.long().to(x.device)
    chunk = max(1, _SDDMM_ELEMENTS // max(1, N))
    parts = [
        (dy[:, rows[i : i + chunk]] * x[:, cols[i : i + chunk]]).sum(0)
        for i in range(0, pattern.nnz, chunk)
    ]
    dval = torch.cat(parts) if parts else x.new_zeros(0)
    if dense_out is None:
        return dval
    if not dense_out.is_contiguous():
        raise ValueError("sddmm: dense_out must be contiguous (it is written by flat index)")
    dense_out.view(-1)[pattern.flat.to(dense_out.device)] = dval
    return dense_out


@dataclass(frozen=True)
class DySegment:
    """A column segment of a product's output gradient dy, given by what the AbsTopK after the
    product returns to it: dy = g where ``mask`` is set (times GELU'(h) when ``h``, the GELU's
    input, is given), 0 elsewhere; without a mask, dy = g. Tensors (N, width); g with unit
    column stride, mask (bool) and h contiguous."""

    g: torch.Tensor
    mask: torch.Tensor | None = None
    h: torch.Tensor | None = None

    def materialise(self) -> torch.Tensor:
        """dy of this segment as a tensor (N, width)."""
        if self.mask is None:
            return self.g
        if self.h is not None:
            return gelu_abstopk_grad(self.g, self.h, self.mask)
        return masked_grad(self.g, self.mask)


def fused_support_backward(
    pattern: CSRPattern,
    val: torch.Tensor,
    dy: list[DySegment],
    x: torch.Tensor,
    dw: torch.Tensor,
    db: torch.Tensor | None,
    *,
    compact: bool = False,
) -> torch.Tensor:
    """The support-mode backward of ``y = x W^T + b`` in one pass over dy's tiles (compiled
    path only), dy given as column segments: returns dx (N, in); writes the support gradient
    into ``dw`` (a zeroed contiguous (out, in) tensor) at the nonzeros, or with ``compact``
    into ``dw`` (nnz,) in the pattern's order, and, if given, dy.sum(0) into ``db`` (out,).
    Bitwise what the segments' AbsTopK backward, then ``spmm`` on W^T, ``sddmm`` and the
    bias sum give separately."""
    p = pattern
    x = x.contiguous()
    segs = [DySegment(as_rows(s.g), s.mask, s.h) for s in dy]  # keep the buffers alive
    rows = (
        torch.tensor(
            [
                [s.g.shape[1], s.g.data_ptr(), s.g.stride(0)]
                + [t.data_ptr() if t is not None else 0 for t in (s.mask, s.h)]
                for s in segs
            ],
            dtype=torch.int64,
        )
        .t()
        .contiguous()
    )  # (5, nseg): widths, g, row strides, masks, GELU inputs
    dx = torch.empty(x.shape, dtype=x.dtype)
    val_t = gather(val, p.perm)
    lib().sc_linear_bwd(
        x.shape[0], p.cols, p.rows, p.crow.data_ptr(), p.crow_t.data_ptr(), p.col_t.data_ptr(),
        val_t.data_ptr(), len(segs), *(r.data_ptr() for r in rows),
        x.data_ptr(), dx.data_ptr(), db.data_ptr() if db is not None else 0, dw.data_ptr(),
        0 if compact else p.flat.data_ptr(), p.perm.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return dx


def fusable(x: torch.Tensor, val: torch.Tensor, dy: list[DySegment]) -> bool:
    """Whether ``fused_support_backward`` takes these tensors: the compiled library, float32
    CPU tensors, masks (bool) and GELU inputs contiguous."""
    floats = [x, val, *(s.g for s in dy), *(s.h for s in dy if s.h is not None)]
    masks = [s.mask for s in dy if s.mask is not None]
    return (
        lib() is not None
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in floats)
        and all(m.dtype == torch.bool and m.is_contiguous() for m in masks)
        and all(s.h.is_contiguous() for s in dy if s.h is not None)
    )


def _fused_regrowth(
    x: torch.Tensor, val: torch.Tensor, dy: list[DySegment], regrowth: Regrowth
) -> bool:
    """Whether a ``regrow`` backward takes the off-support estimate and the one-pass kernel
    (for the exact float32 product alone the plain path is as fast)."""
    cheap = (regrowth.bf16 and native_bf16()) or regrowth.share < 1.0
    return cheap and x.device.type == "cpu" and fusable(x, val, dy)


def linear_backward(
    ctx, dy: list[DySegment]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW, db) of ``y = x W^T + b`` for a ``ctx`` that saved (x, weight, val) and holds
    ``pattern``, ``grad_mode``, ``has_bias`` and ``needs_input_grad`` (inputs x, weight, bias
    first); dy as column segments (a single plain one for a bare product)."""
    x, weight, val = ctx.saved_tensors[:3]
    p: CSRPattern = ctx.pattern
    needs = ctx.needs_input_grad
    dx = dw = db = None
    if ctx.has_bias and needs[2]:
        db = torch.empty(p.rows, dtype=x.dtype, device=x.device)
    support = ctx.grad_mode in ("support", "support_sparse") and needs[1]
    compact = ctx.grad_mode == "support_sparse"
    if support and compact:  # the nonzeros' gradient, in the pattern's order
        dval = torch.empty(p.nnz, dtype=weight.dtype, device=weight.device)
    elif support:  # contiguous whatever the weight's strides: written by flat index
        dw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    if support and needs[0] and fusable(x, val, dy):
        if compact:
            dx = fused_support_backward(p, val, dy, x, dval, db, compact=True)
            return dx, p.coo(dval), db
        return fused_support_backward(p, val, dy, x, dw, db), dw, db
    g = dy[0].materialise() if len(dy) == 1 else torch.cat([s.materialise() for s in dy], -1)
    g = g.reshape(-1, p.rows)
    regrow = ctx.grad_mode == "regrow" and needs[0] and needs[1]
    if regrow and _fused_regrowth(x, val, dy, ctx.regrowth):
        # the estimate off the support, then the one-pass backward for dx, the bias and the
        # exact support entries (overwritten): what the separate kernels give
        dw, excess = _off_support_dw(g, x, ctx.regrowth, p.flat)
        ctx.state.regrow_excess += excess
        return fused_support_backward(p, val, dy, x, dw, db), dw, db
    if needs[0]:  # the bias gradient comes with it (the same pass over dy)
        dx = spmm(p.crow_t, p.col_t, gather(val, p.perm), g, None, p.cols, x_col_sum=db)
    elif db is not None:
        db = g.sum(0)
    if needs[1]:
        if ctx.grad_mode == "dense":
            dw = g.t().mm(x)
        elif ctx.grad_mode == "regrow":
            dw, excess = regrow_weight_grad(p, g, x, ctx.regrowth)
            ctx.state.regrow_excess += excess
        elif compact:
            dw = p.coo(sddmm(p, g, x))
        else:
            sddmm(p, g, x, dense_out=dw)
    return dx, dw, db


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern: CSRPattern, state: LinearKernelState):  # type: ignore[override]
        val = gather(weight.detach(), pattern.flat)
        ctx.save_for_backward(x, weight, val)
        ctx.pattern, ctx.has_bias = pattern, bias is not None
        ctx.grad_mode, ctx.regrowth, ctx.state = state.grad_mode, state.regrowth, state
        return spmm(pattern.crow, pattern.col, val, x, bias, pattern.rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        return *linear_backward(ctx, [DySegment(dy)]), None, None


@dataclass
class LinearKernelState:
    """Per-layer cache of the weight's density and CSR pattern, valid while the weight is
    unchanged (same storage and version counter)."""

    grad_mode: GradMode = "dense"
    regrowth: Regrowth = Regrowth()  # the off-support estimate of ``regrow`` steps
    # the squared-norm excess of this step's regrowth estimate (see ``_off_support_dw``),
    # summed over the layer's backwards since ``set_weight_grad`` reset it
    regrow_excess: float = 0.0
    used_sparse: bool = False  # whether the last call ran the CSR kernels
    pattern: CSRPattern | None = None
    density: float = 1.0
    key: tuple[int, int] | None = None  # (data_ptr, _version) of the cached weight
    pattern_key: tuple[int, int] | None = None
    # (weight ref, its key, pattern, values) of the last inference call
    values: tuple[Any, tuple[int, int], CSRPattern, torch.Tensor] | None = None

    def density_of(self, weight: torch.Tensor) -> float:
        key = _key(weight)
        if self.key != key or key is None:
            density = int(torch.count_nonzero(weight.detach())) / max(1, weight.numel())
            self.key, self.density = key, density  # assigned together (concurrent callers)
            return density
        return self.density

    def values_changed(self, weight: torch.Tensor, support_size: int) -> None:
        """The weight changed only inside a support of ``support_size`` entries that contains
        its nonzeros (the fast training mode's steps between regrowths). The cached pattern
        is kept when it is that whole support (then it still holds every nonzero; entries
        that became 0 are harmless), instead of rescanning the matrix."""
        key = _key(weight)
        pattern = self.pattern
        if pattern is not None and self.pattern_key == self.key and pattern.nnz == support_size:
            self.pattern_key = key
            self.key = key

    def values_for(self, weight: torch.Tensor, pattern: CSRPattern) -> torch.Tensor:
        """The pattern's values gathered from ``weight``, cached while both are unchanged
        (inference reuses them every call; a decoding step is one token, where the gather
        would cost as much as the product)."""
        key = _key(weight)
        cached = self.values
        # The same tensor object (not just the same address and version: a weight replaced by
        # a load can land on the freed one's memory at the same version), unchanged since.
        if (
            cached is not None
            and key is not None
            and cached[0]() is weight
            and cached[1] == key
            and cached[2] is pattern
        ):
            return cached[3]
        val = gather(weight.detach(), pattern.flat)
        self.values = (weakref.ref(weight), key, pattern, val)  # one assignment: consistent
        return val

    def pattern_for(self, weight: torch.Tensor) -> CSRPattern:
        key = _key(weight)
        pattern = self.pattern
        if pattern is None or self.pattern_key != key or key is None:
            pattern = build_pattern(weight)
            self.pattern, self.pattern_key = pattern, key
        return pattern


def _key(weight: torch.Tensor) -> tuple[int, int] | None:
    """What identifies a weight's contents: storage and version counter (None for inference
    tensors, which have no version counter: never cached)."""
    if weight.is_inference():
        return None
    return (weight.data_ptr(), weight._version)


def sparse_pattern(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: LinearKernelState
) -> CSRPattern | None:
    """The weight's CSR pattern when ``x @ weight.T (+ bias)`` should run the CSR kernels (CPU
    float32, density below the measured crossover for its shape), else None. Sets
    ``state.used_sparse`` accordingly."""
    state.used_sparse = False
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or (bias is not None and bias.dtype != torch.float32)
        or torch.is_autocast_enabled(x.device.type)
    ):
        return None
    out_f, in_f = weight.shape
    limit = sparse_below(out_f, in_f)
    if limit <= 0.0:
        return None
    if state.density_of(weight) >= limit:
        state.pattern = None  # a dense weight: drop a stale pattern
        return None
    pattern = state.pattern_for(weight)
    state.used_sparse = True
    return pattern


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: LinearKernelState,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the CSR kernels when the weight's density is
    below the measured crossover for its shape (CPU float32; elsewhere plain ``F.linear``).
    x (..., in) -> (..., out)."""
    pattern = sparse_pattern(x, weight, bias, state)
    if pattern is None:
        return F.linear(x, weight, bias)
    out_f, in_f = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):  # inference: no autograd node, and the values gathered once per weight version
        val = state.values_for(weight, pattern)
        return spmm(pattern.crow, pattern.col, val, x2, bias, pattern.rows).view(*lead, out_f)
    y = _SparseLinear.apply(x2, weight, bias, pattern, state)
    return y.view(*lead, out_f)
