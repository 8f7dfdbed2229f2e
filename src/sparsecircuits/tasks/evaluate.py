"""Evaluate a model on many tasks at once: loss and accuracy per task and split."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsecircuits.tasks import registry
from sparsecircuits.tasks.base import SPLITS, Split, TaskError
from sparsecircuits.tasks.metrics import contrast_loss, final_logits

if TYPE_CHECKING:
    from sparsecircuits.data.tokenizer import Tokenizer
    from sparsecircuits.tasks.batch import TaskBatch

logger = logging.getLogger(__name__)


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    names: Sequence[str] | None = None,
    n_pairs: int = 50,
    seed: int = 0,
    splits: Sequence[Split] = SPLITS,
    batch_size: int = 64,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """``{task: {split: {"loss": nats per prompt, "acc": fraction, "n": pairs}}}``.

    ``names`` defaults to every registered non-control task. Losses are per-prompt means (the
    paper's stored task losses are 2x these). Prompts of all tasks and splits run together,
    sorted by length, so the cost is one pass over ``2 * n_pairs * len(names) * len(splits)``
    short prompts. Prompts are left-truncated to the model's ``config.block_size`` - 1.
    """
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise TaskError(f"unknown split {bad[0]!r}; expected some of {SPLITS}")
    task_names = list(names) if names is not None else registry.names(include_controls=False)
    max_len = int(getattr(getattr(model, "config", None), "block_size", 256))
    start = time.perf_counter()
    batches: list[TaskBatch] = [
        registry.get(name).build(tokenizer, split=split, n=n_pairs, seed=seed, max_len=max_len)
        for name in task_names
        for split in splits
    ]
    prompts = [p for b in batches for p in (*b.prompts_a, *b.prompts_b)]
    # Controls reuse their base task's prompts: run each distinct prompt once.
    unique: dict[tuple[int, ...], int] = {}
    rows = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
    built = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        logits = final_logits(model, [list(p) for p in unique], batch_size=batch_size)[rows]
    finally:
        model.train(was_training)
    results: dict[str, dict[str, dict[str, float | int]]] = {}
    offset = 0
    for b in batches:
        la = logits[offset : offset + b.n]
        lb = logits[offset + b.n : offset + 2 * b.n]
        offset += 2 * b.n
        with torch.no_grad():
            r = contrast_loss(la, lb, b.target_a, b.target_b, other_a=b.other_a, other_b=b.other_b)
        results.setdefault(b.task, {})[b.split] = {
            "loss": float(r.loss),
            "acc": r.accuracy,
            "n": b.n,
        }
    logger.info(
        "evaluated %d tasks x %d splits (%d prompts, %d distinct): build %.2fs, model %.2fs",
        len(task_names),
        len(splits),
        len(prompts),
        len(unique),
        built - start,
        time.perf_counter() - built,
    )
    return results
