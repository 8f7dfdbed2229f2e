"""RMSNorm in one pass forward and one backward (torch runs five or six elementwise passes
over (tokens, d_model) for the pair: about a tenth of a sparse training step here)."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from sparsecircuits.kernels._lib import lib, threads_for
from sparsecircuits.kernels.select import as_rows


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        w = weight.detach().contiguous()
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0])
        lib().sc_rmsnorm_fwd(
            x2.data_ptr(), w.data_ptr(), x2.shape[0], n, ctypes.c_float(eps), y.data_ptr(),
            rstd.data_ptr(), threads_for(x2.numel()),
        )  # fmt: skip
        ctx.save_for_backward(x2, w, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x2, w, rstd = ctx.saved_tensors
        rows, n = x2.shape
        g2 = as_rows(dy)
        dx = torch.empty_like(x2)
        dw = torch.empty(n)
        lib().sc_rmsnorm_bwd(
            x2.data_ptr(), w.data_ptr(), rstd.data_ptr(), g2.data_ptr(), g2.stride(0), rows, n,
            dx.data_ptr(), dw.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return dx.view(dy.shape), dw if ctx.needs_input_grad[1] else None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``F.rms_norm(x, (d,), weight, eps)`` over the last dim; eps None = the dtype's eps."""
    fused = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and lib() is not None
    )
    if not fused:
        return F.rms_norm(x, weight.shape, weight, eps)
    return _RMSNorm.apply(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)
