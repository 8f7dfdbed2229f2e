"""Node masks: the Heaviside gate with a surrogate gradient, and the masked forward pass.

A gate ``g_i`` in {0, 1} (or any float while training) replaces node i's activation ``x_i`` by
``x_i * g_i + mu_i * (1 - g_i)``: kept nodes pass, pruned ones are ablated to ``mu_i`` (a
per-channel pretraining mean, zero, or a task mean). Masks act on the hook sites, i.e. after
AbsTopK, as in the paper (Appendix A.5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sparsecircuits.circuits.nodes import SITE, Location, NodeSpace
from sparsecircuits.errors import InputError
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks, Intervention


class _Heaviside(torch.autograd.Function):
    """H(tau) = [tau >= 0] forward; sigmoid-derivative surrogate ``s(1-s)/T`` backward."""

    @staticmethod
    def forward(ctx, tau: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(tau)
        ctx.temperature = temperature
        return (tau >= 0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (tau,) = ctx.saved_tensors
        s = torch.sigmoid(tau / ctx.temperature)
        return grad * s * (1 - s) / ctx.temperature, None


def heaviside(tau: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Hard 0/1 gates of ``tau`` (any shape) with the straight-through surrogate gradient."""
    if temperature <= 0:
        raise InputError(f"heaviside temperature must be > 0, got {temperature}")
    return _Heaviside.apply(tau, temperature)


@dataclass(frozen=True)
class Ablation:
    """What a pruned node is replaced by: ``values[key]`` (size,) per group key (``"0.attn_q"``,
    ...), and for a masked embedding ``values["embed"]`` (d_model,), the mean token embedding.
    ``kind`` says where the values came from (``mean``, ``zero`` or ``task_mean``)."""

    kind: str
    values: Mapping[str, torch.Tensor]

    def check(self, space: NodeSpace) -> None:
        """Raise InputError unless there is a value vector of the right size for every group."""
        for g in space.groups:
            want = space.config.d_model if g.loc is Location.EMBED else g.size
            v = self.values.get(g.key)
            if v is None or v.shape != (want,):
                got = "missing" if v is None else f"shape {tuple(v.shape)}"
                raise InputError(f"ablation values for {g.key}: expected ({want},), {got}")

    def to(self, device: torch.device | str) -> Ablation:
        return Ablation(self.kind, {k: v.to(device) for k, v in self.values.items()})


def _gate_fn(gate: torch.Tensor, mu: torch.Tensor) -> Intervention:
    def fn(x: torch.Tensor) -> torch.Tensor:
        # x*g + mu*(1-g) is exact for g in {0, 1} (mu + (x - mu)*g would round).
        return x * gate + mu * (1 - gate)

    return fn


def mask_interventions(
    model: GPT,
    space: NodeSpace,
    gates: torch.Tensor,
    ablation: Ablation,
    *,
    idx: torch.Tensor | None = None,
    skip_full: bool = False,
) -> dict[str, Intervention]:
    """Hook interventions applying ``gates`` (space.total,) with ``ablation`` values.

    ``idx`` (B, T) is needed when the embedding is masked (the gate depends on the token).
    ``skip_full``: leave out groups whose gates are all exactly 1 (inference only: it drops
    their gradient path).
    """
    if gates.shape != (space.total,):
        raise InputError(f"expected {space.total} gates, got shape {tuple(gates.shape)}")
    out: dict[str, Intervention] = {}
    for g in space.groups:
        gate = gates[g.offset : g.offset + g.size]
        if skip_full and bool((gate == 1).all()):
            continue
        mu = ablation.values[g.key]
        if g.loc is Location.EMBED:
            if idx is None:
                raise InputError("masking the token embedding needs the token ids")
            wte = model.transformer.wte.weight

            def embed_fn(
                x: torch.Tensor,
                gate: torch.Tensor = gate,
                mu: torch.Tensor = mu,
                wte: torch.Tensor = wte,
            ) -> torch.Tensor:
                # Swap the token's embedding for the mean embedding; positions stay intact.
                off = (1 - gate[idx])[..., None]  # (B, T, 1)
                return x - off * (wte[idx] - mu)

            out["0.resid_in"] = embed_fn
        else:
            out[f"{g.layer}.{SITE[g.loc]}"] = _gate_fn(gate, mu)
    return out


def masked_last_logits(
    model: GPT,
    idx: torch.Tensor,
    lengths: torch.Tensor,
    *,
    space: NodeSpace,
    gates: torch.Tensor,
    ablation: Ablation,
    skip_full: bool = False,
    extra: Mapping[str, Intervention] | None = None,
) -> torch.Tensor:
    """Final-position logits (N, vocab) of right-padded prompts idx (N, T) under ``gates``."""
    interventions = mask_interventions(model, space, gates, ablation, idx=idx, skip_full=skip_full)
    for name, fn in (extra or {}).items():
        inner = interventions.get(name)
        interventions[name] = fn if inner is None else _chain(inner, fn)
    return model.forward_last(idx, lengths, hooks=Hooks(interventions=interventions))


def _chain(first: Intervention, second: Intervention) -> Intervention:
    return lambda x: second(first(x))


# ----------------------------------------------------------------------------- frozen norms
def _norms(model: GPT) -> dict[str, nn.Module]:
    out = {f"{i}.ln_1": b.ln_1 for i, b in enumerate(model.transformer.h)}
    out |= {f"{i}.ln_2": b.ln_2 for i, b in enumerate(model.transformer.h)}
    out["ln_f"] = model.transformer.ln_f
    return out


def _scale(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The per-position factor the norm divides by: (..., 1)."""
    if isinstance(module, nn.RMSNorm):
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5)


@torch.no_grad()
def norm_scales(model: GPT, idx: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """The normalisation factors of every norm in an unmasked pass: {norm: (N, T or 1, 1)}."""
    scales: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(
            lambda mod, args, out, name=name: scales.__setitem__(name, _scale(mod, args[0]))
        )
        for name, m in _norms(model).items()
    ]
    try:
        model.forward_last(idx, lengths)
    finally:
        for h in handles:
            h.remove()
    return scales


@contextlib.contextmanager
def frozen_norms(model: GPT, scales: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, every norm divides by the factors in ``scales`` (from
    :func:`norm_scales` on the same prompts) instead of its input's own statistics, so pruning
    cannot change a prediction merely by rescaling the residual stream (Drori 2026)."""

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str):
        x = args[0]
        if isinstance(mod, nn.RMSNorm):
            y = x * scales[name]
        else:
            y = (x - x.mean(-1, keepdim=True)) * scales[name]
        if mod.weight is not None:
            y = y * mod.weight
        bias = getattr(mod, "bias", None)
        return y + bias if bias is not None else y

    handles = [
        m.register_forward_hook(lambda mod, a, o, name=name: hook(mod, a, o, name))
        for name, m in _norms(model).items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
