"""The last steps of the forward, fused: the logit tables' additions and the loss.

Next-token cross-entropy reading the logits once per step: per row, the max, then the
exponentials summed and (in training) stored as the gradient's row and rescaled while in
cache, so the backward has nothing left to compute. torch's version writes the
log-softmax, zero-fills a gradient buffer and reads both back: at a 2,048-token vocabulary
and 4,096 tokens per step those passes cost as much as a sparse layer."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from sparsecircuits.errors import InputError
from sparsecircuits.kernels._lib import lib, threads_for


class _CrossEntropy(torch.autograd.Function):
    """The forward also writes the gradient for an upstream gradient of 1 when the logits
    need one (the training step's ``loss.backward()``): the backward then hands it out
    (scaled if the upstream gradient is not 1) instead of reading the logits again. That
    buffer (the logits' size) lives as long as the graph does, backward or not."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n_rows, n = logits.shape
        lse = torch.empty(n_rows)
        loss = torch.empty(n_rows)
        counted = int((targets >= 0).sum())
        scale = 1.0 / counted if counted else float("nan")
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        lib().sc_ce_fwd(
            logits.data_ptr(), targets.data_ptr(), n_rows, n, lse.data_ptr(), loss.data_ptr(),
            None if grad is None else grad.data_ptr(), ctypes.c_float(scale),
            torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(logits, targets, lse)
        ctx.counted, ctx.grad = counted, grad
        # mean over counted rows; no counted row gives NaN, as F.cross_entropy does
        return loss.double().sum().float() / counted if counted else loss.sum() / 0.0

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None  # handed out once; a second backward recomputes it
        if grad is not None:
            return (grad if float(g) == 1.0 else grad.mul_(float(g))), None
        logits, targets, lse = ctx.saved_tensors
        n_rows, n = logits.shape
        grad = torch.empty_like(logits)
        scale = float(g) / ctx.counted if ctx.counted else float("nan")
        lib().sc_ce_bwd(
            logits.data_ptr(), targets.data_ptr(), lse.data_ptr(), n_rows, n,
            ctypes.c_float(scale), grad.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats: logits (N, V), targets (N,) int64 (-1 = ignored) -> ()."""
    fused = (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and targets.dtype == torch.int64
        and logits.dim() == 2
        and logits.shape[0] > 0
        and lib() is not None
    )
    if not fused:
        return F.cross_entropy(logits, targets, ignore_index=-1)
    lo, hi = torch.aminmax(targets)
    if int(lo) < -1 or int(hi) >= logits.shape[1]:
        raise InputError(f"targets must be in [-1, {logits.shape[1]}), got [{int(lo)}, {int(hi)}]")
    return _CrossEntropy.apply(logits.contiguous(), targets.contiguous())


class _AddLogitTables(torch.autograd.Function):
    """``logits + bias + table[idx]`` in one pass (the gradient passes through unchanged).
    Not in place: the logits are usually a view, and autograd would copy the whole gradient
    back through it (CopySlices)."""

    @staticmethod
    def forward(ctx, logits, bias, table, idx):  # type: ignore[override]
        n = logits.shape[-1]
        out = torch.empty_like(logits)
        lib().sc_add_logit_tables(
            logits.data_ptr(), out.data_ptr(), None if bias is None else bias.data_ptr(),
            None if table is None else table.data_ptr(), idx.data_ptr(), logits.numel() // n, n,
            threads_for(logits.numel()),
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None, None, None


def add_logit_tables(
    logits: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None, idx: torch.Tensor
) -> torch.Tensor:
    """``logits + bias + table[idx]`` for logits (..., V), bias (V,) or None, table (vocab, V)
    or None, idx (...) int64 token ids. Fixed tables (no gradient) are added in one pass over
    the logits; otherwise through torch."""
    fused = (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.is_contiguous()
        and idx.dtype == torch.int64
        and all(
            t is None or (t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad)
            for t in (bias, table)
        )
        and lib() is not None
    )
    if not fused:
        if bias is not None:
            logits = logits + bias
        return logits if table is None else logits + F.embedding(idx, table)
    if table is not None:
        lo, hi = torch.aminmax(idx) if idx.numel() else (torch.tensor(0), torch.tensor(0))
        if int(lo) < 0 or int(hi) >= table.shape[0]:
            raise InputError(f"token ids must be in [0, {table.shape[0]})")
    return _AddLogitTables.apply(logits, bias, table, idx.reshape(-1).contiguous())
