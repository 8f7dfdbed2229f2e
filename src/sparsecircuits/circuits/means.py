"""Ablation values: per-channel means over pretraining text (cached per model), zeros, or
task means.

Pretraining means follow the paper: one scalar per channel at every mask location, averaged over
all positions of windows of up to ``block_size`` tokens. We take the windows from the corpus's
held-out files (the same distribution as training, never seen by the optimiser), so the result
does not depend on which training batches happened to be drawn.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sparsecircuits.circuits.masking import Ablation
from sparsecircuits.circuits.nodes import SITE, Location, NodeSpace
from sparsecircuits.data.corpus import load_corpus
from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.errors import CheckpointError, InputError
from sparsecircuits.fileio import atomic_write, cache_root
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks

log = logging.getLogger(__name__)

MEANS_FILE = "means.safetensors"  # shipped next to a model; else cached under cache_root()


def _group_sites(space: NodeSpace) -> dict[str, str]:
    return {g.key: f"{g.layer}.{SITE[g.loc]}" for g in space.groups if g.loc is not Location.EMBED}


@torch.no_grad()
def activation_means(
    model: GPT, windows: torch.Tensor, *, space: NodeSpace, lengths: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-channel means at every group of ``space`` over the real positions of ``windows``
    (N, T) int64 (right-padded when ``lengths`` (N,) is given). Also ``"embed"``: the mean
    token embedding (d_model,). Returns float32 CPU tensors."""
    sites = _group_sites(space)
    dev = next(model.parameters()).device
    n, t = windows.shape
    valid = torch.ones(n, t, dtype=torch.bool)
    if lengths is not None:
        valid = torch.arange(t)[None, :] < lengths[:, None]
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in range(0, n, 8):
        idx = windows[start : start + 8].to(dev)
        keep = valid[start : start + 8].to(dev)
        hooks = Hooks(cache_names=sites.values())
        model(idx, hooks=hooks)
        for key, site in sites.items():
            s = hooks.cache[site].float()[keep].sum(0)
            sums[key] = sums.get(key, 0) + s
        emb = model.transformer.wte.weight[idx][keep].float().sum(0)
        sums["embed"] = sums.get("embed", 0) + emb
        count += int(keep.sum())
    if count == 0:
        raise InputError("activation means need at least one token")
    return {k: (v / count).cpu() for k, v in sums.items()}


def pretrain_windows(
    tokenizer: Tokenizer, *, corpus: str = "stdlib", n_windows: int = 64, length: int = 256
) -> torch.Tensor:
    """``n_windows`` windows of ``length`` tokens, evenly spaced over the corpus's held-out files
    joined by end-of-text: (n_windows, length) int64."""
    c = load_corpus(corpus)
    ids: list[int] = []
    need = n_windows * length * 4  # enough text to space the windows out
    for text in c.iter_texts("val"):
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eot_id)
        if len(ids) >= need:
            break
    if len(ids) < length:
        raise InputError(f"corpus {corpus!r}: held-out files hold {len(ids)} tokens, need {length}")
    arr = np.asarray(ids, dtype=np.int64)
    starts = np.linspace(0, len(arr) - length, num=n_windows).astype(np.int64)
    return torch.from_numpy(np.stack([arr[s : s + length] for s in starts]))


def load_or_compute_means(
    model: GPT,
    tokenizer: Tokenizer,
    *,
    model_hash: str,
    model_dir: Path | None = None,
    corpus: str = "stdlib",
    n_windows: int = 64,
    cache_dir: Path | None = None,
) -> dict[str, torch.Tensor]:
    """Pretraining means for ``model``: from ``model_dir/means.safetensors`` if shipped there,
    else from the cache (keyed by the weights hash), else computed now and cached."""
    space = NodeSpace(model.config, mask_embed=False)
    candidates = [] if model_dir is None else [Path(model_dir) / MEANS_FILE]
    cache = (cache_dir or cache_root()) / "means" / f"{model_hash[:24]}-{corpus}-{n_windows}.st"
    candidates.append(cache)
    for path in candidates:
        if path.exists():
            try:
                with safe_open(str(path), framework="pt") as f:
                    made_for = (f.metadata() or {}).get("weights_hash")
                    values = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            except (SafetensorError, OSError) as err:
                log.warning("ignoring unreadable means file %s (%s)", path, err)
                continue
            if made_for != model_hash:  # stale: written for other weights
                log.warning("ignoring %s: computed for other weights", path)
                continue
            try:
                Ablation("mean", values).check(space)
            except InputError as err:
                raise CheckpointError(f"{path}: {err}") from None
            return values
    windows = pretrain_windows(
        tokenizer, corpus=corpus, n_windows=n_windows, length=model.config.block_size
    )
    values = activation_means(model, windows, space=space)
    save_means(values, cache, model_hash=model_hash)
    log.info("cached pretraining means at %s", cache)
    return values


def save_means(values: dict[str, torch.Tensor], path: Path, *, model_hash: str) -> None:
    """Write means with the weights hash they belong to (checked when read back)."""
    atomic_write(path, lambda tmp: save_file(values, tmp, metadata={"weights_hash": model_hash}))


def zero_values(space: NodeSpace) -> dict[str, torch.Tensor]:
    """Zero ablation: every pruned node becomes 0 (the embedding becomes the zero vector)."""
    d = space.config.d_model
    return {g.key: torch.zeros(d if g.loc is Location.EMBED else g.size) for g in space.groups} | {
        "embed": torch.zeros(d)
    }
