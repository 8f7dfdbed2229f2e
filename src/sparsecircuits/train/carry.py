"""Carry a long training run between machines in a few megabytes.

A checkpoint of a weight-sparse run is mostly dense optimizer moments: a 8 x 1024 model's is
~1.3 GB, although after the anneal fewer than 1% of its weights are nonzero. :func:`pack_run`
keeps what a resumed run needs of it: every weight's nonzeros and the Adam moments *on those
nonzeros* (plus dense parameters whole), the step counters, the RNG, the run's config, data
fingerprints, tokenizer and metrics, and its snapshots' nonzeros. The fixed bigram table is not
stored: it is a function of the training data, recomputed on unpacking and checked against its
recorded hash. :func:`unpack_run` writes a run directory with one checkpoint that
``train --resume`` continues.

What is lost: the moments of weights that are zero (the candidates for regrowth) restart at
zero, so the resumed run is not bitwise the uninterrupted one; the weights, the support
moments and every schedule are.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparsecircuits.errors import CheckpointError
from sparsecircuits.fileio import atomic_dir, atomic_write_json, read_json_object
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import load_model, save_model
from sparsecircuits.model.sparsity import sparse_parameter_names
from sparsecircuits.train.checkpoint import (
    OPTIMIZER_FILE,
    SNAPSHOTS,
    STATE_FILE,
    TrainState,
    list_checkpoints,
    save_checkpoint,
)
from sparsecircuits.train.optim import build_optimizer

CARRY_FILE = "carry.safetensors"
CARRY_FORMAT = 1
RUN_FILES = ("train_config.json", "data.json", "tokenizer.json", "metrics.jsonl")
_MAX_DENSITY = 0.25  # tensors at most this dense are stored as nonzeros (as compact_state)
_SKIP = ("bigram_table",)  # recomputed from the data on unpacking


def table_hash(model: GPT) -> str | None:
    """sha256 of the fixed bigram table's float32 bytes (None when the model has none)."""
    table = getattr(model, "bigram_table", None)
    if table is None:
        return None
    return hashlib.sha256(table.detach().float().contiguous().numpy().tobytes()).hexdigest()


def pack_run(run_dir: str | Path, dest: str | Path) -> dict[str, Any]:
    """Pack the newest checkpoint of ``run_dir`` (and its snapshots) into ``dest``.

    Returns a summary: step, tokens, bytes written."""
    run_dir, dest = Path(run_dir), Path(dest)
    _check_pack_target(run_dir, dest)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(f"{run_dir}: no checkpoint to pack (checkpoints/step_* missing)")
    ckpt = checkpoints[-1]
    for name in RUN_FILES:
        if not (run_dir / name).exists():
            raise CheckpointError(f"{run_dir}: {name} is missing; not a complete training run")
    from sparsecircuits.train.config import TrainConfig  # the run's optimizer settings

    cfg = TrainConfig.from_json_file(run_dir / "train_config.json")
    model = load_model(ckpt)
    optimizer = build_optimizer(model, cfg.optim)
    try:
        extra = torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(extra["optimizer"])
    except Exception as err:  # truncated file, other parameter layout
        raise CheckpointError(f"{ckpt / OPTIMIZER_FILE}: cannot read ({err})") from None
    tensors: dict[str, torch.Tensor] = {"torch_rng": extra["torch_rng"]}
    steps: dict[str, float] = {}
    sp = cfg.sparsity
    # The parameters the top-k projection keeps sparse: their nonzeros and the moments on them.
    # Every other parameter is stored whole, whatever zeros it happens to hold.
    projected = set(
        sparse_parameter_names(
            model,
            dense_embeddings=sp.dense_embeddings,
            dense_unembed=sp.dense_unembed,
            dense_biases=sp.dense_biases,
        )
    )
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        index = None
        if name in projected and sp.target_l0 < 1.0:
            index = p.detach().reshape(-1).nonzero().squeeze(1)
            tensors[f"{name}::idx"] = index.to(torch.int32)
        tensors[f"{name}::w"] = _select(p.detach(), index)
        if state:
            tensors[f"{name}::m"] = _select(state["exp_avg"], index)
            tensors[f"{name}::v"] = _select(state["exp_avg_sq"], index)
            steps[name] = float(state["step"])
    for name, b in model.named_buffers():
        if name not in _SKIP:
            tensors[f"{name}::buf"] = b.detach().clone()
    meta = {
        "format": str(CARRY_FORMAT),
        "source_checkpoint": ckpt.name,
        "steps": json.dumps(steps),
        "bigram_sha256": json.dumps(table_hash(model)),
        "config": json.dumps(model.config.to_json_dict()),
    }
    with atomic_dir(dest) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / CARRY_FILE), meta)
        for name in RUN_FILES:
            shutil.copyfile(run_dir / name, tmp / name)
        shutil.copyfile(ckpt / STATE_FILE, tmp / STATE_FILE)
        for snap in sorted((run_dir / SNAPSHOTS).glob("step_*")):
            (tmp / SNAPSHOTS).mkdir(exist_ok=True)
            weights = {
                k: v for k, v in load_model(snap).state_dict().items() if not k.endswith(_SKIP)
            }
            packed = {}
            for k, v in weights.items():
                flat = v.reshape(-1)
                nz = flat.nonzero().squeeze(1)
                if v.is_floating_point() and nz.numel() <= _MAX_DENSITY * flat.numel():
                    packed[f"{k}::idx"], packed[f"{k}::w"] = nz.to(torch.int32), flat[nz].clone()
                else:
                    packed[f"{k}::w"] = v.contiguous()
            save_file(packed, str(tmp / SNAPSHOTS / f"{snap.name}.safetensors"))
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    state = read_json_object(dest / STATE_FILE)
    return {"step": state["step"], "tokens": state["tokens"], "bytes": total, "dest": str(dest)}


def unpack_run(
    src: str | Path, run_dir: str | Path, *, cache_dir: str | Path | None = None
) -> TrainState:
    """Write ``run_dir`` from a packed run: its files and one checkpoint to ``--resume`` from.

    The training data must be the run's (its fingerprint is checked) because the bigram table
    is rebuilt from it."""
    from sparsecircuits.train.config import TrainConfig

    src, run_dir = Path(src), Path(run_dir)
    if not (src / CARRY_FILE).is_file():
        raise CheckpointError(f"{src}: no {CARRY_FILE}; not a packed run")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir}: not empty; unpack into a new directory")
    try:
        tensors = load_file(str(src / CARRY_FILE))
        with safe_open(str(src / CARRY_FILE), framework="pt") as fh:
            meta = fh.metadata()
        if meta.get("format") != str(CARRY_FORMAT):
            raise ValueError(f"format {meta.get('format')!r}, expected {CARRY_FORMAT}")
        steps = json.loads(meta["steps"])
        table_sha = json.loads(meta["bigram_sha256"])
    except Exception as err:  # safetensors raises its own types for a damaged file
        raise CheckpointError(f"{src / CARRY_FILE}: unreadable packed run ({err})") from None
    cfg = TrainConfig.from_json_file(src / "train_config.json")
    # Built beside the target and renamed into place at the end: an interrupted or failed
    # unpack leaves no run directory that --resume would restart from step 0.
    with atomic_dir(run_dir) as tmp:
        state = _unpack_into(src, tmp, cfg, tensors, steps, table_sha, cache_dir)
    return state


def _unpack_into(
    src: Path,
    run_dir: Path,
    cfg: Any,
    tensors: dict[str, torch.Tensor],
    steps: dict[str, float],
    table_sha: str | None,
    cache_dir: str | Path | None,
) -> TrainState:
    from sparsecircuits.train.trainer import Trainer

    for name in RUN_FILES:
        shutil.copyfile(src / name, run_dir / name)
    trainer = Trainer(cfg, run_dir=run_dir, device="cpu", cache_dir=cache_dir, resume=True)
    model, _ = trainer.build_model()
    if table_hash(model) != table_sha:
        raise CheckpointError(
            f"{src}: the bigram table rebuilt from corpus '{cfg.corpus}' differs from the "
            "packed run's; unpack with the data the run trained on"
        )
    optimizer = build_optimizer(model, cfg.optim)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _scatter(p.data, tensors, name, "w", src)
            if name in steps:
                state = optimizer.state[p]
                state["step"] = torch.tensor(steps[name])
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
                _scatter(state["exp_avg"], tensors, name, "m", src)
                _scatter(state["exp_avg_sq"], tensors, name, "v", src)
        for name, b in model.named_buffers():
            if name not in _SKIP:
                if f"{name}::buf" not in tensors:
                    raise CheckpointError(f"{src / CARRY_FILE}: buffer {name} is missing")
                b.copy_(tensors[f"{name}::buf"])
    torch.set_rng_state(tensors["torch_rng"])
    saved = read_json_object(src / STATE_FILE)
    state = TrainState(
        step=int(saved["step"]),
        tokens=int(saved["tokens"]),
        elapsed_s=float(saved.get("elapsed_s", 0.0)),
        grad_shares={str(k): float(v) for k, v in saved.get("grad_shares", {}).items()},
    )
    save_checkpoint(
        run_dir,
        model=model,
        optimizer=optimizer,
        state=state,
        tokenizer_file=run_dir / "tokenizer.json",
        keep=cfg.keep_checkpoints,
    )
    _unpack_snapshots(src, run_dir, model, cfg)
    return state


def _check_pack_target(run_dir: Path, dest: Path) -> None:
    """``dest`` is replaced whole: never the run, a folder holding it, or a non-pack folder."""
    run, target = run_dir.resolve(), dest.resolve()
    if target == run or run in target.parents or target in run.parents:
        raise CheckpointError(f"--out {dest}: must be outside the run {run_dir} (it is replaced)")
    if target.exists() and not (target / CARRY_FILE).is_file():
        raise CheckpointError(
            f"--out {dest}: exists and is not a packed run; choose a new directory"
        )


def _select(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    flat = t.reshape(-1)
    return (flat if index is None else flat[index]).clone()


def _scatter(target: torch.Tensor, tensors: dict, name: str, kind: str, src: Path) -> None:
    key = f"{name}::{kind}"
    if key not in tensors:
        raise CheckpointError(f"{src / CARRY_FILE}: {key} is missing")
    flat = target.view(-1)
    idx = tensors.get(f"{name}::idx")
    try:
        if idx is None:
            flat.copy_(tensors[key].reshape(-1))
        else:
            flat.zero_()
            flat[idx.long()] = tensors[key]
    except (RuntimeError, IndexError) as err:  # another model's shapes
        raise CheckpointError(f"{src / CARRY_FILE}: {key} does not fit the model ({err})") from None


def _unpack_snapshots(src: Path, run_dir: Path, model: GPT, cfg: Any) -> None:
    snaps = sorted((src / SNAPSHOTS).glob("step_*.safetensors"))
    if not snaps:
        return
    template = {k: v.clone() for k, v in model.state_dict().items()}
    for path in snaps:
        packed = load_file(str(path))
        state = dict(template)
        for key, value in template.items():
            if any(key.endswith(s) for s in _SKIP):
                continue
            dense = torch.zeros_like(value)
            if f"{key}::idx" in packed:
                dense.view(-1)[packed[f"{key}::idx"].long()] = packed[f"{key}::w"]
            else:
                dense.copy_(packed[f"{key}::w"].reshape(value.shape))
            state[key] = dense
        model.load_state_dict(state)
        final = run_dir / SNAPSHOTS / path.name.removesuffix(".safetensors")
        with atomic_dir(final) as tmp:
            save_model(model, tmp, compact=True)
            shutil.copyfile(run_dir / "tokenizer.json", tmp / "tokenizer.json")
            atomic_write_json(tmp / "sparsity.json", cfg.sparsity.model_dump(mode="json"))
