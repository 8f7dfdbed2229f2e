"""One optimizer step of the sparse trainer: forward/backward, gradient averaging, RMS control,
AdamW, then the top-k projection (or, in the fast mode, keeping the supports)."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from sparsecircuits.kernels import GradMode, Regrowth
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.layers import (
    regrowth_excess,
    set_weight_grad,
    support_only_weights,
    weights_kept_support,
)
from sparsecircuits.model.sparsity import WeightSparsity
from sparsecircuits.train import distributed as D
from sparsecircuits.train.config import OptimConfig, SparsityConfig
from sparsecircuits.train.objective import Objective
from sparsecircuits.train.optim import (
    corrected_sq,
    estimated_sq,
    grad_rms_scale,
    rescale_grads_,
    support_shares,
)
from sparsecircuits.train.support_adamw import SupportAdamW

StepMode = Literal["exact", "regrow", "support"]
RegrowPrecision = Literal["fp32", "bf16"]


def train_step(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    sparsity: WeightSparsity,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    frac: float,
    mode: StepMode = "exact",
    support_opt: SupportAdamW | None = None,
    optim: OptimConfig,
    dist: D.DistInfo = D.SINGLE_PROCESS,
    precision: str = "fp32",
    regrow_precision: RegrowPrecision = "bf16",
    regrow_tokens: float = SparsityConfig().regrow_tokens,
    objective: Objective | None = None,
) -> tuple[float, float]:
    """One optimizer step on (x, y) (B, T): forward/backward, gradient averaging over ranks,
    RMS control, AdamW at ``lr``, then the top-k projection at L0 fraction ``frac``.

    ``mode``: "exact" (the paper: dense weight gradients, projection every step); the fast
    mode's "regrow" steps (the same, and they measure which share of the gradient lies on
    the supports) and "support" steps (weight gradients only on the current supports, which
    are kept instead of projected again; the gradient RMS is estimated with that share).
    ``support_opt`` (fast mode) steps AdamW on the support entries only where it can.
    ``regrow_precision`` "bf16": "regrow" steps take the off-support weight gradients from a
    bfloat16 product where the CPU has one (``kernels/linear.py``); ``regrow_tokens`` < 1: from
    that share of the sequences (scaled up), the supports' gradients still from all of them;
    both default to the trainer's defaults (``SparsityConfig``).
    ``objective``: its loss instead of the next-token loss; its extra parameters' gradients
    are averaged over ranks with the model's and it steps them after the model's step.
    Returns (this rank's loss in nats/token, gradient RMS before rescaling)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    support = mode == "support" and bool(sparsity.masks)
    grad_mode: GradMode = "dense"
    if support:  # the support AdamW reads sparse gradients directly: no dense zeros
        grad_mode = "support_sparse" if support_opt is not None else "support"
    elif mode == "regrow" and (regrow_precision == "bf16" or regrow_tokens < 1.0):
        grad_mode = "regrow"
    regrowth = Regrowth(bf16=regrow_precision == "bf16", share=regrow_tokens, seq=x.shape[-1])
    # only the projected weights: any other Linear needs its whole, exact gradient
    set_weight_grad(model, grad_mode, only=sparsity.params.values(), regrowth=regrowth)
    with autocast_context(precision, x.device):
        if objective is None:
            _, loss = model(x, y)  # the loss itself is computed in fp32 (see GPT.forward)
        else:
            loss = objective.loss(model, x, y)
    loss.backward()
    restricted = support_only_weights(model) if support else []
    measured = regrowth_excess(model) if grad_mode == "regrow" and regrowth.share < 1 else []
    set_weight_grad(model, "dense")  # exact gradients again for anyone using the model later
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # the objective's parameters ride in the same all-reduce (one flat buffer, one call)
    extra = objective.parameters() if objective is not None else []
    D.average_gradients_(params + extra, dist)
    named = dict(model.named_parameters())
    excess = _excess_by_name(named, measured, dist, x.device)
    index = sparsity.support_index() if support or mode == "regrow" else {}
    if mode == "regrow":
        sparsity.grad_shares = support_shares(named, index, excess=excess)
    if support:
        sq = estimated_sq(named, index, sparsity.grad_shares)
    else:  # the regrowth estimate's token noise is not gradient (kernels/linear.py)
        sq = corrected_sq(named, excess) if excess else None
    grad_rms, scale = grad_rms_scale(params, optim, sq=sq)
    if support_opt is not None and support:
        # support-only weights: AdamW on their supports with the RMS factor folded in (their
        # dense gradients are never swept); the moments' decay off the support is deferred
        by_id = {id(sparsity.params[n]): i for n, i in index.items()}
        on_support = {id(w): by_id[id(w)] for w in restricted if id(w) in by_id}
        rescale_grads_(params, scale, skip=frozenset(on_support))
        support_opt.step(on_support, grad_scale=scale)
    else:
        rescale_grads_(params, scale)
        if support_opt is not None:  # a dense step: bring every moment up to date first
            support_opt.catch_up({id(sparsity.params[n]): m for n, m in sparsity.masks.items()})
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if objective is not None:  # its own optimiser, outside the model's RMS control
        objective.step()
    if support:
        done = frozenset(id(w) for w in restricted) if support_opt is not None else frozenset()
        sparsity.keep_support_(skip=done)
        weights_kept_support(model, sparsity.support_sizes())
    else:
        sparsity.project_(frac)
    return float(loss.detach()), grad_rms


def _excess_by_name(
    named: dict[str, torch.nn.Parameter],
    measured: list[tuple[torch.nn.Parameter, float]],
    dist: D.DistInfo,
    device: torch.device,
) -> dict[str, float]:
    """{parameter name: the squared-norm excess of its averaged regrowth estimate}: each
    rank's excess is that of its own tokens' estimate, and averaging W independent estimates
    divides their noise by W."""
    values = D.mean_over_ranks([e for _, e in measured], dist, device)
    by_id = {id(w): e / dist.world_size for (w, _), e in zip(measured, values, strict=True)}
    return {n: by_id[id(p)] for n, p in named.items() if by_id.get(id(p), 0.0) > 0.0}


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``precision == "bf16"``; otherwise a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
