"""The trainer's extension point: an :class:`Objective` replaces the plain next-token loss.

A run without one (the default) trains on ``model(x, y)``'s loss, exactly as before. With one,
:func:`~sparsecircuits.train.step.train_step` asks it for the loss, and the trainer lets it
carry extra trainable parameters (e.g. bridges to a frozen model) through everything a run
does to the model's own: their gradients are averaged over ranks in the same all-reduce, their
optimiser steps right after the model's, their state goes into every checkpoint and comes back
on ``--resume``, and their artifacts are written beside each checkpoint and the final model.

The protocol lives here, in ``train/``, so that later layers (``bridges/``) can plug into the
trainer without the trainer importing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from sparsecircuits.model.gpt import GPT
from sparsecircuits.train import distributed as D


class Objective(Protocol):
    """What the trainer needs of a custom training objective (all methods are called on every
    rank unless said otherwise)."""

    def bind(self, model: GPT) -> None:
        """Called once with the freshly built model (on the run's device), before the run
        directory is written and before a checkpoint is restored: check the model fits (raise
        a one-line ``SparseCircuitsError`` if not) and create the extra parameters, identically
        on every rank."""
        ...

    def loss(self, model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scalar loss to minimise for inputs ``x`` and next tokens ``y`` (B, T) int64;
        called inside the step's autocast context, with the model in training mode."""
        ...

    def parameters(self) -> list[nn.Parameter]:
        """The extra trainable parameters (not the model's); their gradients are averaged over
        ranks with the model's, but not counted in the model's gradient-RMS control."""
        ...

    def step(self) -> None:
        """Apply the extra parameters' optimiser step and clear their gradients (after the
        model's step)."""
        ...

    def metrics(self) -> dict[str, float]:
        """Numbers for the metrics log at a log step (the trainer averages them over ranks):
        means since the previous call. Every rank must return the same keys."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (parameters, optimiser state), loadable by
        ``torch.load(..., weights_only=True)``: tensors, numbers, strings, lists and dicts."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (raise on a mismatch)."""
        ...

    def save(self, directory: Path, model: GPT) -> None:
        """Write the objective's artifacts for ``model`` into ``directory`` (a checkpoint being
        written, or the run directory after the final model); rank 0 only."""
        ...


def objective_metrics(
    objective: Objective | None, dist: D.DistInfo, device: torch.device
) -> dict[str, float]:
    """``objective``'s metrics averaged over ranks ({} without one); a collective under
    torchrun, so every rank calls it at the same steps."""
    if objective is None:
        return {}
    extra = objective.metrics()
    return dict(zip(extra, D.mean_over_ranks(list(extra.values()), dist, device), strict=True))
