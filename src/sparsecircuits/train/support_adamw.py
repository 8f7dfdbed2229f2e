"""AdamW steps at the cost of the nonzeros, for the fast mode's steps between regrowths.

On such a step every weight gradient outside the current supports is zero, and the weights
there are re-zeroed after the step. torch's AdamW would still sweep every entry: for an entry
with g = 0 it only decays the moments (m <- beta1 m, v <- beta2 v). This step updates the
support entries exactly as ``torch.optim.AdamW`` (single-tensor path) does and defers the
off-support decay: ``catch_up`` applies beta^s for the s skipped steps before the next dense
step or checkpoint. The result equals dense AdamW + re-zeroing up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsecircuits.kernels.optim import adamw_at_


class SupportAdamW:
    """Support-only steps for some parameters of a ``torch.optim.AdamW``; the others (and every
    parameter on dense steps) go through the optimizer itself."""

    def __init__(self, optimizer: torch.optim.AdamW) -> None:
        self.opt = optimizer
        self.skipped: dict[int, int] = {}  # id(param) -> support steps since its moments' decay
        # id(param) -> (support index, exp_avg, exp_avg_sq at it): the support entries' moments
        # while support steps run; the optimizer's own state is stale there until catch_up
        self.compact: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, supports: dict[int, torch.Tensor], *, grad_scale: float = 1.0) -> None:
        """One AdamW step; parameters with an entry in ``supports`` ({id(param): flat int64
        indices of its support}) are updated there only, with their gradient times
        ``grad_scale`` (the gradient-RMS control's factor, applied here instead of on the
        whole dense gradient). The other parameters' gradients are used as they are."""
        hidden: list[tuple[nn.Parameter, torch.Tensor]] = []
        for group in self.opt.param_groups:
            for p in group["params"]:
                index = supports.get(id(p))
                if index is None and p.grad is not None:  # a dense step for it: its moments
                    self._write_back(p)  # must be the current ones
                if index is None or p.grad is None:
                    continue
                self._update(p, group, index, grad_scale)
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
        """Bring the optimizer's state up to date: the compact moments written back, and the
        deferred moment decay applied outside each parameter's support ({id: mask}). Call it
        before a dense step, a checkpoint, or anything else reading the optimizer's state."""
        for group in self.opt.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                self._write_back(p)
                s = self.skipped.pop(id(p), 0)
                if s == 0 or id(p) not in masks:
                    continue
                state = self.opt.state[p]
                off = ~masks[id(p)]
                state["exp_avg"].mul_(torch.where(off, beta1**s, 1.0))
                state["exp_avg_sq"].mul_(torch.where(off, beta2**s, 1.0))

    def _update(self, p: nn.Parameter, group: dict, index: torch.Tensor, scale: float) -> None:
        """torch's single-tensor AdamW arithmetic on the entries ``index`` of ``p``."""
        state = self.opt.state[p]
        if not state:  # first step of this parameter: torch's own initial state
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        held = self.compact.get(id(p))
        if held is None or held[0] is not index:  # a new support: its moments, compact
            self._write_back(p)
            held = (index, state["exp_avg"].view(-1)[index], state["exp_avg_sq"].view(-1)[index])
            self.compact[id(p)] = held
        grad, compact_grad = p.grad, p.grad.is_sparse
        if compact_grad:
            # a sparse gradient holds the weight's nonzeros (its CSR pattern), which lie in
            # the support: as many as the support's entries, they are those, in flat order
            grad = grad._values()
            if grad.numel() != index.numel():  # some support entry is exactly zero
                grad, compact_grad = p.grad.to_dense(), False
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adamw_at_(
            p.detach(), held[1], held[2], grad, index,  # detach shares p's version counter
            step=int(state["step"]), lr=group["lr"], weight_decay=group["weight_decay"],
            beta1=beta1, beta2=beta2, eps=group["eps"], grad_scale=scale, compact=True,
            compact_grad=compact_grad,
        )  # fmt: skip

    def _write_back(self, p: nn.Parameter) -> None:
        """The compact moments of ``p`` (if any) back into the optimizer's state."""
        held = self.compact.pop(id(p), None)
        if held is not None:
            index, m, v = held
            state = self.opt.state[p]
            state["exp_avg"].view(-1)[index] = m
            state["exp_avg_sq"].view(-1)[index] = v
