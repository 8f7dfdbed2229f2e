"""Small building blocks: AbsTopK activation sparsity, norms and attention with a sink."""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from sparsecircuits.kernels import (
    GradMode,
    LinearKernelState,
    Regrowth,
    abstopk,
    abstopk_,
    causal_attention,
    gelu_abstopk,
    rms_norm,
    sparse_linear,
)
from sparsecircuits.kernels.linear_topk import Segment, sparse_linear_topk
from sparsecircuits.model.config import GPTConfig


class Linear(nn.Linear):
    """``nn.Linear`` whose product costs what the weight's nonzeros cost: below the measured
    density crossover it runs the CSR kernels (``kernels/linear.py``), else a dense matmul.
    Same parameters and state dict as ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.kernel = LinearKernelState()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.weight, self.bias, self.kernel)


def set_weight_grad(
    model: nn.Module,
    mode: GradMode,
    *,
    only: Collection[nn.Parameter] | None = None,
    regrowth: Regrowth | None = None,
) -> None:
    """Weight-gradient mode of every ``Linear`` in ``model``: ``"dense"`` (exact, the default),
    ``"support"`` (only at the current nonzeros; ``"support_sparse"``: the same as a sparse COO
    gradient) or ``"regrow"`` (exact on the nonzeros, a
    ``regrowth`` estimate elsewhere; see ``kernels/linear.py``). With
    ``only``, layers whose weight is not among these get ``"dense"`` (weights that are not
    projected to a support need their whole gradient)."""
    keep = None if only is None else {id(p) for p in only}
    for m in model.modules():
        if isinstance(m, Linear):
            m.kernel.grad_mode = mode if keep is None or id(m.weight) in keep else "dense"
            m.kernel.regrowth = regrowth or Regrowth()
            m.kernel.regrow_excess = 0.0


def regrowth_excess(model: nn.Module) -> list[tuple[nn.Parameter, float]]:
    """(weight, the squared-norm excess of its regrowth estimate) for every ``Linear``, in
    module order (0.0 where none was measured since ``set_weight_grad``)."""
    return [(m.weight, m.kernel.regrow_excess) for m in model.modules() if isinstance(m, Linear)]


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (forward or backward, pre or post), its own
    or global ones."""
    kinds = ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")
    glob = torch.nn.modules.module
    return any(getattr(module, f"_{k}", None) or getattr(glob, f"_global_{k}", None) for k in kinds)


def support_only_weights(model: nn.Module) -> list[nn.Parameter]:
    """Weights whose last gradient was support-only: ``Linear`` layers that ran the CSR kernels
    in a support mode (others, and embeddings, had dense gradients)."""
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, Linear)
        and m.kernel.used_sparse
        and m.kernel.grad_mode in ("support", "support_sparse")
    ]


def weights_kept_support(model: nn.Module, supports: dict[int, int]) -> None:
    """Weights changed only inside their supports (the fast training mode's steps between
    regrowths): ``{id(weight): support size}``. The ``Linear`` layers using them keep their
    cached CSR patterns where those are the whole support."""
    for m in model.modules():
        if isinstance(m, Linear) and id(m.weight) in supports:
            m.kernel.values_changed(m.weight, supports[id(m.weight)])


def abstopk_k(afrac: float, width: int) -> int:
    """Entries AbsTopK keeps of ``width`` channels at keep-fraction ``afrac`` (the official
    ``int(afrac * width)``)."""
    return int(afrac * width)


class ActSparsity:
    """AbsTopK at the configured node locations: ``k = int(afrac * width)`` per token."""

    def __init__(self, config: GPTConfig) -> None:
        self.afrac = config.afrac
        self.locs = frozenset(config.afrac_loctypes) if config.afrac is not None else frozenset()

    def k(self, width: int) -> int:
        """Entries AbsTopK keeps of ``width`` channels."""
        return abstopk_k(self.afrac, width)

    def __call__(self, x: torch.Tensor, loc: str) -> torch.Tensor:
        """AbsTopK of ``x`` at ``loc``. Without gradients it works in place: every caller
        passes a temporary of the forward pass (a norm's, a product's or a sum's output)."""
        if loc not in self.locs:
            return x
        k = self.k(x.shape[-1])
        if not (torch.is_grad_enabled() and x.requires_grad):
            return abstopk_(x, k)
        return abstopk(x, k)

    def gelu(self, x: torch.Tensor, loc: str) -> torch.Tensor:
        """GELU, then AbsTopK at ``loc`` (one fused backward pass for both)."""
        if loc not in self.locs:
            return F.gelu(x)
        return gelu_abstopk(x, self.k(x.shape[-1]))

    def linear(
        self, module: nn.Module, x: torch.Tensor, locs: tuple[str, ...], *, gelu: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """``module(x)`` cut into ``len(locs)`` equal column segments, each through AbsTopK at
        its location (after a GELU with ``gelu``). On the sparse training path the product and
        the AbsTopKs are one autograd node whose backward applies the masks as it reads the
        gradients (``kernels/linear_topk.py``); elsewhere the ops run one by one, with the
        same results. x (..., in) -> tuple of (..., out / len(locs)). ``module``: a
        ``Linear`` or anything with ``out_features`` (e.g. a sparse-storage ``CSRLinear``);
        a module with hooks is called as a module, so that they run."""
        width = module.out_features // len(locs)
        if isinstance(module, Linear) and not _hooked(module) and self.locs.issuperset(locs):
            segs = tuple(Segment(width, self.k(width), gelu) for _ in locs)
            fused = sparse_linear_topk(x, module.weight, module.bias, module.kernel, segs)
            if fused is not None:
                return fused
        parts = module(x).split(width, dim=-1)
        act = self.gelu if gelu else self
        return tuple(act(p, loc) for p, loc in zip(parts, locs, strict=True))


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (eps 1e-5, as in the official code)."""

    def __init__(self, ndim: int, *, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters, eps and hooks) through the fused kernel on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.normalized_shape != (x.shape[-1],):
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)


def attend_all(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: AttentionSink | None
) -> torch.Tensor:
    """Attention of queries that see every key (a decoding step), with the sink's logit as one
    more softmax entry whose value is 0. q (B, H, Tq, d_head), k and v (B, H, T, d_head) ->
    (B, H, Tq, d_head). Written out: for one query this is cheaper than building a mask and
    padding k and v with the sink's slot."""
    if sink is None:
        return F.scaled_dot_product_attention(q, k, v)
    B, H, Tq, _ = q.shape
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Tq, T)
    b = sink.sink_logit.to(q.dtype).view(1, H, 1, 1).expand(B, H, Tq, 1)
    p = torch.softmax(torch.cat([b, scores], dim=-1), dim=-1)[..., 1:]
    return p @ v


def make_norm(config: GPTConfig, *, width: int | None = None) -> nn.Module:
    """RMSNorm (paper default, torch's default eps) or LayerNorm over ``width`` channels
    (default d_model)."""
    width = config.d_model if width is None else width
    if config.rms_norm:
        return RMSNorm(width)
    return LayerNorm(width, bias=config.ln_bias)


class AttentionSink(nn.Module):
    """Per-head sink logit ``b_h``: an always-visible extra key with k = 0, v = 0.

    Adds ``exp(b_h)`` to each softmax denominator, letting a head attend "nowhere". The module
    exists (as ``attn.attn_imp``) so parameter names match the official checkpoints.
    """

    def __init__(self, n_head: int) -> None:
        super().__init__()
        self.sink_logit = nn.Parameter(torch.zeros(n_head))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention with the sink. q (B, H, Tq, d_head), k and v (B, H, T, d_head), visible
        (B or 1, Tq, T) bool (which keys each query may see; None = causal with Tq = T)
        -> (B, H, Tq, d_head)."""
        if visible is None:
            return self._causal(q, k, v)
        B, H, Tq, D = q.shape
        Bm = visible.shape[0]
        zeros = k.new_zeros(B, H, 1, D)
        k = torch.cat([zeros, k], dim=2)
        v = torch.cat([zeros, v], dim=2)
        mask = q.new_zeros(visible.shape).masked_fill(~visible, -torch.inf)  # (Bm, Tq, T)
        sink = self.sink_logit.to(q.dtype).view(1, H, 1, 1).expand(Bm, H, Tq, 1)
        mask = torch.cat([sink, mask[:, None].expand(Bm, H, Tq, -1)], dim=3)  # (Bm, H, Tq, T+1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention with the sink, without a T x T mask tensor."""
        return causal_attention(q, k, v, self.sink_logit)


def sinusoids(n_pos: int, width: int) -> torch.Tensor:
    """The official fixed position channels (n_pos, width): sin then cos of positions at
    width // 2 periods log-spaced from 4 to n_pos tokens, zero-padded (odd width)."""
    half = max(1, width // 2)
    periods = torch.logspace(math.log10(4.0), math.log10(max(4.0, float(n_pos))), steps=half)
    angles = torch.arange(n_pos, dtype=torch.float32)[:, None] * (2 * math.pi / periods)
    enc = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(enc, (0, max(0, width - enc.shape[1])))[:, :width]
