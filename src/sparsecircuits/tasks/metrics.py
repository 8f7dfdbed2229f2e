"""Task loss and accuracy: two-token softmax cross-entropy at each prompt's final position.

Units: losses are in nats **per prompt**, averaged over both prompts of each pair and over pairs.
The losses stored in the paper's released viz data are the *sum* over the two prompts of a pair,
i.e. **2x the numbers computed here** (its viz code says so: "off by a factor of 2"); the numbers
the paper reports, including the 0.15 pruning target, are per-prompt means like ours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sparsecircuits.errors import InputError


@dataclass(frozen=True)
class ContrastLoss:
    """Loss and accuracy of N pairs (2N prompts).

    ``loss``: scalar, mean per-prompt loss in nats (differentiable). ``accuracy``: fraction of
    the 2N prompts whose correct token's logit is strictly larger than the other's (a tie counts
    as wrong, so an all-zero model scores 0, not 0.5). ``loss_a``/``loss_b``: (N,) per-prompt
    losses; ``correct_a``/``correct_b``: (N,) bool.
    """

    loss: torch.Tensor
    accuracy: float
    loss_a: torch.Tensor
    loss_b: torch.Tensor
    correct_a: torch.Tensor
    correct_b: torch.Tensor


def prompt_loss(
    logits: torch.Tensor, correct: torch.Tensor, other: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt ``-log softmax([z[correct], z[other]])[0]`` and whether z[correct] > z[other].

    logits: (N, V) final-position logits; correct, other: (N,) int64 token ids.
    Returns (N,) float32 losses in nats and (N,) bool.
    """
    if logits.dim() != 2 or correct.shape != (logits.shape[0],) or other.shape != correct.shape:
        raise InputError(
            f"expected logits (N, V) and targets (N,), got {tuple(logits.shape)}, "
            f"{tuple(correct.shape)} and {tuple(other.shape)}"
        )
    correct, other = correct.to(logits.device), other.to(logits.device)  # targets live on CPU
    d = logit_diffs(logits, correct, other)
    return diff_losses(d), d > 0


# ----------------------------------------------------------------------------- the one source
CHANCE_LOSS = math.log(2)  # nats per prompt: the two-token loss of a coin flip (d = 0)


# Every task loss, accuracy and calibration in the package (metrics, pruning, validation,
# comparison) is computed from correct-minus-other logit differences by the functions below.
def logit_diffs(logits: torch.Tensor, correct: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``z[correct] - z[other]`` per row: logits (N, V), correct/other (N,) -> (N,) float32."""
    z_c = logits.gather(1, correct[:, None]).squeeze(1).float()
    z_o = logits.gather(1, other[:, None]).squeeze(1).float()
    return z_c - z_o


def diff_losses(diffs: torch.Tensor) -> torch.Tensor:
    """Per-prompt two-token loss from logit differences d (N,): ``softplus(-d)`` in nats (N,),
    i.e. ``-log softmax([z_c, z_o])[0]``, stable for any gap; differentiable."""
    return F.softplus(-diffs)


def diff_loss(diffs: torch.Tensor) -> float:
    """Mean per-prompt loss (nats) of logit differences (N,)."""
    return float(diff_losses(diffs.detach()).mean())


def diff_accuracy(diffs: torch.Tensor) -> float:
    """Fraction of prompts whose correct token wins strictly (a tie counts as wrong)."""
    return float((diffs.detach() > 0).float().mean())


class Calibration(NamedTuple):
    """A logit calibration ``scale * d + shift * s`` (s = +1 for A prompts, -1 for B prompts):
    ``scale`` > 0 rescales the logit gap, ``shift`` moves every prompt toward the same token."""

    scale: float
    shift: float


def calibrated(diffs: torch.Tensor, signs: torch.Tensor, cal: Calibration | None) -> torch.Tensor:
    """``diffs`` (N,) after ``cal`` (unchanged when None); signs (N,) are +1/-1 (A/B)."""
    if cal is None:
        return diffs
    return cal.scale * diffs + cal.shift * signs.to(diffs.device, diffs.dtype)


def fit_calibration(diffs: torch.Tensor, signs: torch.Tensor, *, steps: int = 16) -> Calibration:
    """Fit a logit scale and shift (16 LBFGS steps, the paper's optional calibration) minimising
    the mean loss of :func:`calibrated` diffs. The scale is constrained positive (fitted as
    ``exp(u)``): a calibration may sharpen or soften what the circuit says, never invert it (an
    unconstrained fit makes an inverted control "reach" the target with a negative scale). The
    shift acts along the A/B signs because a uniform shift of all logits would not change a
    two-token softmax. diffs, signs: (N,)."""
    d, s = diffs.detach().double().cpu(), signs.detach().double().cpu()
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # (log scale, shift)
    opt = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.softplus(-(params[0].clamp(-30, 30).exp() * d + params[1] * s)).mean()
        loss.backward()
        return loss

    opt.step(closure)
    u, b = params.detach().tolist()
    return Calibration(float(torch.tensor(u).clamp(-30, 30).exp()), float(b))


def contrast_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    *,
    other_a: torch.Tensor | None = None,
    other_b: torch.Tensor | None = None,
) -> ContrastLoss:
    """The paired task loss (per-prompt mean; the paper's stored numbers are 2x this).

    logits_a, logits_b: (N, V) final-position logits of prompts A and B. Prompt A is scored
    ``target_a`` vs ``other_a`` (default ``target_b``), prompt B ``target_b`` vs ``other_b``
    (default ``target_a``); all (N,) int64.
    """
    other_a = target_b if other_a is None else other_a
    other_b = target_a if other_b is None else other_b
    loss_a, ok_a = prompt_loss(logits_a, target_a, other_a)
    loss_b, ok_b = prompt_loss(logits_b, target_b, other_b)
    loss = torch.cat([loss_a, loss_b]).mean()
    accuracy = torch.cat([ok_a, ok_b]).float().mean().item()
    return ContrastLoss(loss, accuracy, loss_a, loss_b, ok_a, ok_b)


def pad_prompts(
    prompts: Sequence[Sequence[int]], *, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (N, T_max) int64 ids and (N,) int64 lengths.

    Right padding is harmless under causal attention: position t never sees positions > t, so
    each prompt's last real position gives the same logits as an unpadded run.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt must have at least one token")
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    idx = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    return idx, lengths


@torch.no_grad()
def final_logits(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, batch_size: int = 64
) -> torch.Tensor:
    """Logits at each prompt's last token: (N, V) float32 on the CPU, in the order of ``prompts``.

    Prompts are sorted by length and run ``batch_size`` at a time (right-padded), so a batch
    holds prompts of similar length and little compute goes to padding. ``model(idx)`` must return
    ``(logits (B, T, V), ...)`` with causal attention.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: torch.Tensor | None = None
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        idx, lengths = pad_prompts([prompts[i] for i in chunk])
        idx, lengths = idx.to(device), lengths.to(device)
        if hasattr(model, "forward_last"):  # skips the vocab projection of other positions
            last = model.forward_last(idx, lengths)
        else:
            logits = model(idx)[0]  # (B, T, V)
            last = logits[torch.arange(len(chunk), device=device), lengths - 1]
        if out is None:
            out = torch.empty(len(prompts), last.shape[-1], dtype=torch.float32)
        out[torch.tensor(chunk)] = last.float().cpu()
    if out is None:
        raise InputError("final_logits needs at least one prompt")
    return out
