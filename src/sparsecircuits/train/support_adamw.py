"""AdamW steps at the cost of the nonzeros, for the fast mode's steps between regrowths.

On such a step every weight gradient outside the current supports is zero, and the weights
there are re-zeroed after the step. torch's AdamW would still sweep every entry: for an entry
with g = 0 it only decays the moments (m <- beta1 m, v <- beta2 v). This step updates the
support entries exactly as ``torch.optim.AdamW`` (single-tensor path) does and defers the
off-support decay: ``catch_up`` applies beta^s for the s skipped steps before the next dense
step or checkpoint. The result equals dense AdamW + re-zeroing up to float rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SupportAdamW:
    """Support-only steps for some parameters of a ``torch.optim.AdamW``; the others (and every
    parameter on dense steps) go through the optimizer itself."""

    def __init__(self, optimizer: torch.optim.AdamW) -> None:
        self.opt = optimizer
        self.skipped: dict[int, int] = {}  # id(param) -> support steps since its moments' decay
        self._flat: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (mask, flat idx)

    @torch.no_grad()
    def step(self, supports: dict[int, torch.Tensor]) -> None:
        """One AdamW step; parameters with an entry in ``supports`` ({id(param): bool mask})
        are updated on their mask only."""
        hidden: list[tuple[nn.Parameter, torch.Tensor]] = []
        for group in self.opt.param_groups:
            for p in group["params"]:
                mask = supports.get(id(p))
                if mask is None or p.grad is None:
                    continue
                self._update(p, group, self._flat_of(p, mask))
                self.skipped[id(p)] = self.skipped.get(id(p), 0) + 1
                hidden.append((p, p.grad))
                p.grad = None  # the optimizer skips it
        try:
            self.opt.step()
        finally:
            for p, g in hidden:
                p.grad = g

    @torch.no_grad()
    def catch_up(self, masks: dict[int, torch.Tensor]) -> None:
        """Apply the deferred moment decay outside each parameter's support ({id: mask})."""
        for group in self.opt.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                s = self.skipped.pop(id(p), 0)
                if s == 0 or id(p) not in masks:
                    continue
                state = self.opt.state[p]
                off = ~masks[id(p)]
                state["exp_avg"].mul_(torch.where(off, beta1**s, 1.0))
                state["exp_avg_sq"].mul_(torch.where(off, beta2**s, 1.0))
        self._flat.clear()

    def _flat_of(self, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cached = self._flat.get(id(p))
        if cached is None or cached[0] is not mask:
            cached = (mask, mask.reshape(-1).nonzero().squeeze(1))
            self._flat[id(p)] = cached
        return cached[1]

    def _update(self, p: nn.Parameter, group: dict, idx: torch.Tensor) -> None:
        """torch's single-tensor AdamW arithmetic on the entries ``idx`` of ``p``."""
        state = self.opt.state[p]
        if not state:  # first step of this parameter: torch's own initial state
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        pf, mf, vf = p.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        g = p.grad.reshape(-1)[idx]
        w, m, v = pf[idx], mf[idx], vf[idx]
        w.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        pf[idx], mf[idx], vf[idx] = w, m, v
