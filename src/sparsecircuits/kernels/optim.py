"""Optimizer arithmetic on a weight's support, given as flat indices (the fast training mode).

Between regrowths each sparse weight changes only on its support (1/64 of it at L0 1/64, less
later). Through torch these steps gather, update and scatter back with indexing ops, about
40x the cost of the arithmetic at d_model 1024; the kernels visit the support entries once.
"""

from __future__ import annotations

import ctypes
import math

import torch

from sparsecircuits.kernels._lib import lib


def _cpp(*ts: torch.Tensor) -> bool:
    return lib() is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in ts
    )


def support_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat int64 indices of a boolean mask's set entries, ascending -> (nnz,)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def sumsq(g: torch.Tensor, index: torch.Tensor | None = None) -> float:
    """Sum of squares of ``g``'s entries (only those at flat ``index`` when given), accumulated
    in double precision on the compiled path."""
    if index is not None and index.dtype != torch.int64:
        raise TypeError(f"sumsq: index must be int64, got {index.dtype}")
    if _cpp(g) and (index is None or index.device.type == "cpu"):
        index = None if index is None else index.contiguous()  # held while the kernel reads it
        n = g.numel() if index is None else index.numel()
        ptr = 0 if index is None else index.data_ptr()
        return float(lib().sc_sumsq(n, ptr, g.data_ptr(), torch.get_num_threads()))
    flat = g.reshape(-1) if index is None else g.reshape(-1)[index]
    wide = torch.float32 if flat.device.type == "mps" else torch.float64  # MPS has no float64
    return float(flat.to(wide).pow(2).sum())


@torch.no_grad()
def adamw_at_(
    w: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    index: torch.Tensor,
    *,
    step: int,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    grad_scale: float = 1.0,
    compact: bool = False,
    compact_grad: bool = False,
) -> None:
    """One AdamW step (``step`` counts from 1) on the entries at flat ``index`` of ``w`` and
    its moments, in place, with the gradient ``grad * grad_scale``; torch's single-tensor
    AdamW arithmetic, entries outside ``index`` untouched. ``compact``: the moments hold the
    support's entries only, (nnz,) in ``index`` order (cheaper: fewer scattered accesses);
    ``compact_grad``: so does ``grad``."""
    if index.dtype != torch.int64:  # a bool mask would silently become indices 0 and 1
        raise TypeError(f"adamw_at_: index must be int64 flat indices, got {index.dtype}")
    if compact and not exp_avg.numel() == exp_avg_sq.numel() == index.numel():
        raise ValueError(
            f"adamw_at_: compact moments must have the index's {index.numel()} entries, got "
            f"{exp_avg.numel()} and {exp_avg_sq.numel()}"
        )
    if compact_grad and grad.numel() != index.numel():
        raise ValueError(
            f"adamw_at_: a compact gradient must have the index's {index.numel()} entries, "
            f"got {grad.numel()}"
        )
    step_size = lr / (1 - beta1**step)
    bc2_sqrt = math.sqrt(1 - beta2**step)
    if _cpp(w, exp_avg, exp_avg_sq, grad) and index.device.type == "cpu":
        index = index.contiguous()
        hp = (ctypes.c_float * 8)(
            grad_scale, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, step_size,
            bc2_sqrt, eps,
        )  # fmt: skip
        lib().sc_adamw_at(
            index.numel(), index.data_ptr(), grad.data_ptr(), w.data_ptr(), exp_avg.data_ptr(),
            exp_avg_sq.data_ptr(), ctypes.addressof(hp), int(compact) | 2 * int(compact_grad),
            torch.get_num_threads(),
        )  # fmt: skip
        # Written behind autograd's back: bump the version so caches keyed on it (the linear
        # layers' patterns and inference values) see the new weights.
        torch.autograd.graph.increment_version(w)
        return
    pf, mf, vf = w.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1)
    g = grad.reshape(-1) if compact_grad else grad.reshape(-1)[index]
    if grad_scale != 1.0:
        g = g * grad_scale
    p = pf[index]
    m, v = (mf, vf) if compact else (mf[index], vf[index])
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)
    pf[index] = p
    if not compact:
        mf[index], vf[index] = m, v
