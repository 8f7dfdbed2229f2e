"""Side effects of each ``dampen`` rule: what the rest of the model loses when a family is
dampened for a whole forward pass.

For each dampen rule, with its intervention on every pass: the change in accuracy (and loss) of
every registered task (``tasks/evaluate.py``, held-out test templates), split into the family's
own tasks and every other task, and the change in held-out next-token loss on windows of the
corpus's held-out files (the text ``eval-loss`` scores; the first ``loss_windows`` windows
spread over them, as the pretraining means pick them, not every window).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sparsecircuits import tasks
from sparsecircuits.circuits.means import pretrain_windows
from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks, Intervention
from sparsecircuits.monitor.calibrate import FlagRule
from sparsecircuits.monitor.catalog import CatalogDoc
from sparsecircuits.monitor.policy import Policy
from sparsecircuits.monitor.scores import dampen_interventions
from sparsecircuits.tasks.evaluate import evaluate_tasks


class Intervened(nn.Module):
    """``model`` with ``interventions`` on every pass, for code that calls ``model(idx)`` or
    ``model.forward_last(idx, lengths)`` (the task evaluator)."""

    def __init__(self, model: GPT, interventions: Mapping[str, Intervention]) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.fns = dict(interventions)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets, hooks=Hooks(interventions=self.fns))

    def forward_last(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.forward_last(idx, lengths, hooks=Hooks(interventions=self.fns))


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, *, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) of ``windows`` (N, block_size + 1)."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], batch):
        w = windows[s : s + batch].to(dev)
        _, loss = model(w[:, :-1], w[:, 1:])
        total += float(loss) * w[:, 1:].numel()
        count += w[:, 1:].numel()
    return total / count


def policy_check(
    model: GPT,
    tokenizer: Tokenizer,
    catalog: CatalogDoc,
    policy: Policy,
    *,
    task_names: Sequence[str] | None = None,
    n_pairs: int = 20,
    loss_windows: int = 4,
    corpus: str = "stdlib",
) -> list[dict[str, Any]]:
    """One record per dampen rule: ``{rule, family, dampen, own_tasks, other_tasks,
    heldout_loss}``; task entries are ``{acc, acc_dampened, delta_acc, loss, loss_dampened}``
    (test split; accuracy a fraction, losses nats per prompt), ``heldout_loss`` is
    ``{plain, dampened, delta}`` in nats/token. ``task_names``: default every registered
    non-control task."""
    names = list(task_names) if task_names is not None else tasks.names(include_controls=False)
    # The flag thresholds do not matter here: the family is dampened for the whole pass.
    rules = [r for r in policy.rules(FlagRule()) if r.dampen is not None]
    if not rules:
        return []
    windows = pretrain_windows(tokenizer, corpus=corpus, n_windows=loss_windows,
                               length=model.config.block_size + 1)  # fmt: skip
    base_tasks = evaluate_tasks(model, tokenizer, names=names, n_pairs=n_pairs, splits=("test",))
    base_loss = heldout_loss(model, windows)
    out = []
    for rule in rules:
        d = rule.dampen
        assert d is not None
        fam = catalog.family_nodes(rule.family).to(next(model.parameters()).device)
        damp = Intervened(model, dampen_interventions(fam, mode=d.mode, factor=d.factor or 0.0))
        after = evaluate_tasks(damp, tokenizer, names=names, n_pairs=n_pairs, splits=("test",))
        own = set(catalog.families[rule.family].tasks)
        rows = {}
        for t in names:
            b, a = base_tasks[t]["test"], after[t]["test"]
            rows[t] = {"acc": b["acc"], "acc_dampened": a["acc"],
                       "delta_acc": a["acc"] - b["acc"], "loss": b["loss"],
                       "loss_dampened": a["loss"]}  # fmt: skip
        loss = heldout_loss(damp, windows)
        out.append({
            "rule": rule.name, "family": rule.family, "dampen": d.model_dump(),
            "own_tasks": {t: r for t, r in rows.items() if t in own},
            "other_tasks": {t: r for t, r in rows.items() if t not in own},
            "heldout_loss": {"plain": base_loss, "dampened": loss, "delta": loss - base_loss},
            "n_pairs": n_pairs, "loss_windows": loss_windows,
        })  # fmt: skip
    return out
