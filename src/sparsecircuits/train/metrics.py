"""Evaluation (validation loss, dead neurons) and the metrics JSONL log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsecircuits.data import TokenStore
from sparsecircuits.errors import DataError
from sparsecircuits.fileio import atomic_write_bytes
from sparsecircuits.model.gpt import GPT


@torch.no_grad()
def evaluate(
    model: GPT, store: TokenStore, *, windows: int, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """Mean next-token loss (nats/token) over the first ``windows`` windows of ``store``, and
    the number of MLP neurons per layer that were never nonzero on those tokens."""
    T = model.config.block_size
    was_training = model.training
    model.eval()
    names = [f"{i}.mlp.post_act" for i in range(model.config.n_layer)]
    alive = [torch.zeros(model.config.mlp_width, dtype=torch.bool) for _ in names]
    total, count = 0.0, 0
    batch: list[np.ndarray] = []

    def flush() -> None:
        nonlocal total, count
        xy = torch.from_numpy(np.stack(batch)).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        logits, cache = model.run_with_cache(x, names=names)
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), reduction="sum"
        )
        total += float(loss)
        count += y.numel()
        for i, n in enumerate(names):
            alive[i] |= (cache[n] != 0).flatten(0, 1).any(0).cpu()
        batch.clear()

    for w in store.iter_windows(T + 1, max_windows=windows):
        batch.append(w)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)
    if count == 0:
        raise DataError(f"{store.directory}: no validation window of {T + 1} tokens to evaluate")
    return {
        "val_loss": total / max(count, 1),
        "val_tokens": count,
        "dead_neurons": [int((~a).sum()) for a in alive],
    }


HELDOUT_BATCH = 16  # windows per forward pass in heldout_loss (the shipped cards' setting)


def heldout_loss(
    model: GPT, store: TokenStore, *, windows: int | None = None, device: torch.device
) -> dict[str, Any]:
    """Validation loss as a model card reports it: :func:`evaluate` over every full
    ``block_size + 1``-token window of ``store`` (or only the first ``windows``), in batches of
    :data:`HELDOUT_BATCH`. The card writer and ``sparsecircuits eval-loss`` both call this, so
    the command's default reproduces a card's number."""
    n = store.num_windows(model.config.block_size + 1)
    n = n if windows is None else min(windows, n)
    return evaluate(model, store, windows=n, batch_size=HELDOUT_BATCH, device=device)


class MetricsLog:
    """Append-only JSONL of metric records; ``truncate_after(step)`` drops records a resumed run
    will produce again (and any partial last line left by a kill)."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if rec.get("step", 0) <= step:
                kept.append(line)
        atomic_write_bytes(self.path, "".join(x + "\n" for x in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
