"""Causal self-attention with an optional per-head sink logit, for narrow heads.

The paper's models use many 16-wide heads, far from what general flash kernels tile for. On
CPU with float32 and ``d_head`` in 8, 16, 32 or 64, ``causal_attention`` runs the compiled
narrow-head kernel (``csrc/attention.cpp``: one (batch, head) per task, exact softmax, forward
and backward). Elsewhere it uses torch: the CPU flash kernel with a log-sum-exp correction for
the sink, or ``scaled_dot_product_attention`` with the sink as an extra padded channel (any
device). All paths compute the same function and gradients (to float32 rounding).

The sink is an always-visible extra key with logit ``b_h`` and value 0: it adds ``exp(b_h)``
to each softmax denominator, letting a head attend "nowhere".
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from sparsecircuits.kernels._lib import lib, threads_for

NARROW_HEADS = (8, 16, 32, 64)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_logit: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal softmax attention, scale 1/sqrt(d_head). q, k, v (B, H, T, d_head) with any
    strides; sink_logit (H,) or None -> (B, H, T, d_head)."""
    if _NarrowAttention.available(q, k, v):
        return _NarrowAttention.apply(q, k, v, sink_logit)
    return torch_causal_attention(q, k, v, sink_logit)


def torch_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_logit: torch.Tensor | None = None
) -> torch.Tensor:
    """``causal_attention`` through torch's kernels only (the fallback, and the reference)."""
    if sink_logit is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if _FlashSink.available(q):
        return _FlashSink.apply(q, k, v, sink_logit)
    return causal_padded(q, k, v, sink_logit)


def causal_padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_logit: torch.Tensor
) -> torch.Tensor:
    """The sink through the fused causal kernel on any device: the sink becomes key 0 and one
    extra channel carries its logit: queries get a 1 there, the sink key ``b_h * sqrt(d_head)``
    (with the softmax scale 1/sqrt(d_head), its score is ``b_h``), token keys 0. A dummy query
    in front shifts the causal alignment so that query t sees the sink and tokens 0..t."""
    B, H, _, D = q.shape
    b = sink_logit.to(q.dtype).view(1, H, 1, 1) * D**0.5
    q1 = F.pad(F.pad(q, (0, 1), value=1.0), (0, 0, 1, 0))  # (B, H, T+1, D+1)
    sink_key = torch.cat([k.new_zeros(B, H, 1, D), b.expand(B, H, 1, 1)], dim=3)
    k1 = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)  # (B, H, T+1, D+1)
    v1 = F.pad(v, (0, 1, 1, 0))  # (B, H, T+1, D+1): the sink's value is 0
    y = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True, scale=D**-0.5)
    return y[:, :, 1:, :D]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_major_empty(B: int, H: int, T: int, D: int) -> torch.Tensor:
    """A (B, H, T, D) view of a contiguous (B, T, H, D) buffer: what the model reshapes to
    (B, T, H * D) next, without a copy."""
    return torch.empty(B, T, H, D).transpose(1, 2)


def _strides(*ts: torch.Tensor) -> torch.Tensor:
    return torch.tensor([s for t in ts for s in t.stride()[:3]], dtype=torch.int64)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _NarrowAttention(torch.autograd.Function):
    """The compiled narrow-head kernel: forward saves the output and the per-row log-sum-exp
    (sink included); backward recomputes the probabilities from them."""

    @staticmethod
    def available(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        return (
            q.shape[-1] in NARROW_HEADS
            and q.shape[-2] > 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v))
            and lib() is not None
        )

    @staticmethod
    def forward(ctx, q, k, v, sink_logit):  # type: ignore[override]
        q, k, v = (_unit_last(t) for t in (q, k, v))
        B, H, T, D = q.shape
        sink = None if sink_logit is None else sink_logit.detach().float().contiguous()
        y = _head_major_empty(B, H, T, D)
        lse = torch.empty(B, H, T)
        strides = _strides(q, k, v, y)
        scale = D**-0.5
        rc = lib().sc_attn_fwd(
            B, H, T, D, q.data_ptr(), k.data_ptr(), v.data_ptr(), strides.data_ptr(),
            _ptr(sink), ctypes.c_float(scale), y.data_ptr(), lse.data_ptr(),
            threads_for(B * H * T * T * D),
        )  # fmt: skip
        if rc != 0:  # unreachable: available() checked d_head
            raise RuntimeError(f"sc_attn_fwd: unsupported d_head {D}")
        ctx.save_for_backward(q, k, v, y, lse, sink_logit)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        q, k, v, y, lse, sink_logit = ctx.saved_tensors
        dy = _unit_last(dy)
        B, H, T, D = q.shape
        dq, dk, dv = (_head_major_empty(B, H, T, D) for _ in range(3))
        sink = None if sink_logit is None else sink_logit.detach().float().contiguous()
        dsink = None if sink is None else torch.empty(B, H)
        strides = _strides(q, k, v, y, dy, dq, dk, dv)
        lib().sc_attn_bwd(
            B, H, T, D, q.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), dy.data_ptr(),
            strides.data_ptr(), lse.data_ptr(), _ptr(sink), ctypes.c_float(ctx.scale),
            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), _ptr(dsink), torch.get_num_threads(),
        )  # fmt: skip
        g_sink = None
        if sink_logit is not None and ctx.needs_input_grad[3]:
            g_sink = dsink.sum(0).to(sink_logit.dtype)
        return dq, dk, dv, g_sink


class _FlashSink(torch.autograd.Function):
    """Sink attention from the CPU flash kernel's output and log-sum-exp, at d_head (an odd
    d_head + 1 costs the kernel ~1.5x).

    With the sink's logit b_h, the normaliser becomes lse' = logaddexp(lse, b_h), so
    y = out * exp(lse - lse'). The backward is the flash backward of the sink attention itself:
    given y and lse' the kernel recomputes p' = exp(s - lse') (the probabilities with the sink)
    and uses rowsum(dy * y), which is exactly that attention's. The sink (value 0) gets
    d b_h = -sum exp(b_h - lse') * rowsum(dy * y).
    """

    _fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    _bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

    @classmethod
    def available(cls, q: torch.Tensor) -> bool:
        return (
            cls._fwd is not None
            and cls._bwd is not None
            and q.device.type == "cpu"
            and q.dtype == torch.float32
        )

    @staticmethod
    def forward(ctx, q, k, v, sink_logit):  # type: ignore[override]
        scale = q.shape[-1] ** -0.5
        out, lse = _FlashSink._fwd(q, k, v, 0.0, True, scale=scale)  # lse: (B, H, T)
        lse_sink = torch.logaddexp(lse, sink_logit.detach().view(1, -1, 1))
        y = out * torch.exp(lse - lse_sink).unsqueeze(-1)
        ctx.save_for_backward(q, k, v, y, lse_sink, sink_logit)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        q, k, v, y, lse_sink, sink_logit = ctx.saved_tensors
        dy = dy.contiguous()
        dq, dk, dv = _FlashSink._bwd(dy, q, k, v, y, lse_sink, 0.0, True, scale=ctx.scale)
        delta = (dy * y).sum(-1)  # (B, H, T)
        p_sink = torch.exp(sink_logit.view(1, -1, 1) - lse_sink)
        return dq, dk, dv, -(p_sink * delta).sum(dim=(0, 2))
