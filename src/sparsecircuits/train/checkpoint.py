"""Training checkpoints: written to a temp directory, then renamed, so they are never partial.

Layout: ``<run>/checkpoints/step_00000100/`` holding ``config.json`` + ``model.safetensors``
(loadable by ``load_model``), ``tokenizer.json``, ``optimizer.pt`` (optimizer state and RNG) and
``state.json`` (step, tokens seen); a run with an ``Objective`` (``train/objective.py``) also
keeps its state in ``optimizer.pt`` and its artifacts in the directory. The data position is
the step: batches are a pure function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsecircuits.errors import CheckpointError, SparseCircuitsError
from sparsecircuits.fileio import atomic_dir, atomic_write, atomic_write_json
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import load_model, save_model
from sparsecircuits.train.objective import Objective

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass(frozen=True)
class TrainState:
    step: int  # optimizer steps completed
    tokens: int  # training tokens seen (global)
    elapsed_s: float = 0.0  # wall-clock seconds of training so far, summed over resumes
    # fast mode: per parameter, the gradient's share on its support at the last regrowth
    grad_shares: dict[str, float] = field(default_factory=dict)


def save_checkpoint(
    run_dir: Path,
    *,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    tokenizer_file: Path,
    keep: int,
    objective: Objective | None = None,
) -> Path:
    """Write a complete checkpoint for ``state.step`` and prune older ones beyond ``keep``
    (with ``objective``: its state and artifacts too, inside the same atomic directory)."""
    final = Path(run_dir) / CHECKPOINTS / f"step_{state.step:08d}"
    with atomic_dir(final) as tmp:
        save_model(model, tmp)
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        extra = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if objective is not None:
            extra["objective"] = objective.state_dict()
            objective.save(tmp, model)
        atomic_write(tmp / OPTIMIZER_FILE, lambda p: torch.save(extra, p))
        atomic_write_json(
            tmp / STATE_FILE,
            {
                "step": state.step,
                "tokens": state.tokens,
                "elapsed_s": state.elapsed_s,
                "grad_shares": state.grad_shares,
            },
        )
    for old in list_checkpoints(run_dir)[:-keep]:
        # Rename first: a kill mid-delete must not leave a half-deleted "step_*" directory.
        doomed = old.with_name(f".tmp-del-{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def save_snapshot(
    run_dir: Path, *, model: GPT, step: int, tokenizer_file: Path, sparsity: dict
) -> Path:
    """Keep a compact, loadable copy of the model at ``step`` in ``snapshots/step_N/``
    (weights as indices + values, the tokenizer and the sparsity settings; no optimizer)."""
    final = Path(run_dir) / SNAPSHOTS / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        save_model(model, tmp, compact=True)
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        atomic_write_json(tmp / "sparsity.json", sparsity)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp directories are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    return sorted(dirs, key=lambda p: p.name)


def load_checkpoint(
    path: Path,
    *,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    objective: Objective | None = None,
) -> TrainState:
    """Restore model weights, optimizer state and RNG (and ``objective``'s state) from one
    checkpoint directory."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        step, tokens = int(state["step"]), int(state["tokens"])
        elapsed = float(state.get("elapsed_s", 0.0))
        shares = {str(k): float(v) for k, v in state.get("grad_shares", {}).items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable checkpoint state ({err})") from None
    loaded = load_model(path)
    if loaded.config != model.config:
        raise CheckpointError(f"{path}: model config differs from the run's config")
    model.load_state_dict(loaded.state_dict())
    try:
        extra = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["torch_rng"])
        if objective is not None:  # KeyError here: a plain run's checkpoint
            objective.load_state_dict(extra["objective"])
    except Exception as err:  # truncated zip, wrong keys, mismatched param groups
        raise CheckpointError(
            f"{path / OPTIMIZER_FILE}: cannot restore optimizer ({err})"
        ) from None
    if objective is None and "objective" in extra:  # resumed without it, the loss would change
        raise SparseCircuitsError(f"{path}: this run trains with an extra objective (e.g. "
                                  "bridge train); resume it with its own command")  # fmt: skip
    return TrainState(step=step, tokens=tokens, elapsed_s=elapsed, grad_shares=shares)


def remove_stale_temps(run_dir: Path) -> int:
    """Delete temp directories a killed run left behind (a checkpoint or the final model being
    written, an old checkpoint being deleted); returns how many."""
    roots = [Path(run_dir), Path(run_dir) / CHECKPOINTS, Path(run_dir) / SNAPSHOTS]
    stale = [p for r in roots if r.is_dir() for p in r.glob(".tmp-*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def restore_latest(
    run_dir: Path,
    *,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    objective: Objective | None = None,
) -> tuple[Path, TrainState] | None:
    """Restore the newest checkpoint that loads; an unreadable one (e.g. after an OS crash) is
    skipped with a warning in favour of the one before. None when the run has none."""
    errors = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(ckpt, model=model, optimizer=optimizer, objective=objective)
            return ckpt, state
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
            errors.append(str(err))
    if errors:
        raise CheckpointError(f"{run_dir}: no readable checkpoint ({errors[0]})")
    return None
