"""Post-hoc bridges: fit encoders and decoders between two frozen models (``bridge fit``).

Loss per batch, every site i (coefficients in :class:`FitConfig`)::

    NMSE(f_i(h_dense_i), h_sparse_i) + NMSE(g_i(h_sparse_i), h_dense_i)
      + KL(dense || d->s hybrid from i) + KL(dense || s->d hybrid from i)

(targets of the NMSE terms and the dense logits are fixed: the models are frozen). Files in the
output directory, each written atomically: ``bridges.safetensors`` and ``bridges.json`` (sites,
sizes, both models' weights hashes, the config, the last losses), and ``checkpoint.pt`` (the
bridges, the optimiser, the step and the sampler's state) from which ``--resume`` continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.losses import hybrid_d2s, hybrid_s2d, kl, nmse, residuals
from sparsecircuits.errors import InputError
from sparsecircuits.fileio import atomic_write, atomic_write_json
from sparsecircuits.model.gpt import GPT

log = logging.getLogger(__name__)
WEIGHTS_FILE, META_FILE, CHECKPOINT_FILE = "bridges.safetensors", "bridges.json", "checkpoint.pt"


class FitConfig(BaseModel):
    """What a post-hoc fit does (validated; unknown fields are an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(default=500, ge=1)
    batch: int = Field(default=8, ge=1)
    seq_len: int = Field(default=128, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    seed: int = 0
    coef_nmse: float = Field(default=1.0, ge=0)
    coef_kl: float = Field(default=1.0, ge=0)
    k: int | None = Field(default=None, ge=1)  # encoder AbsTopK keep-count (None: dense)
    checkpoint_every: int = Field(default=50, ge=1)


def check_pair(sparse: GPT, dense: GPT) -> None:
    """The two models must share the layer count (the sites) and the vocabulary."""
    s, d = sparse.config, dense.config
    if s.n_layer != d.n_layer:
        raise InputError(f"bridges need one layer count: sparse {s.n_layer}, dense {d.n_layer}")
    if s.vocab_size != d.vocab_size:
        raise InputError(f"bridges need one vocabulary: sparse {s.vocab_size}, dense "
                         f"{d.vocab_size} tokens")  # fmt: skip


def fit_loss(sparse: GPT, dense: GPT, bridges: Bridges, idx: torch.Tensor, cfg: FitConfig):
    """(loss, {term: value per site}) of one batch ``idx`` (B, T)."""
    with torch.no_grad():
        dense_logits, hd = residuals(dense, idx, bridges.sites)
        _, hs = residuals(sparse, idx, bridges.sites)
    parts: dict[str, list[float]] = {"enc_nmse": [], "dec_nmse": [], "kl_d2s": [], "kl_s2d": []}
    total = torch.zeros(())
    for site in bridges.sites:
        b = bridges[site]
        d2s = hybrid_d2s(sparse, bridges, site, hd[site], idx)
        s2d = hybrid_s2d(dense, bridges, site, hs[site], idx)
        terms = {
            "enc_nmse": cfg.coef_nmse * nmse(b.encode(hd[site]), hs[site]),
            "dec_nmse": cfg.coef_nmse * nmse(b.decode(hs[site]), hd[site]),
            "kl_d2s": cfg.coef_kl * kl(dense_logits, d2s),
            "kl_s2d": cfg.coef_kl * kl(dense_logits, s2d),
        }
        for name, v in terms.items():
            parts[name].append(float(v.detach()))
            total = total + v
    return total, parts


def _save(out: Path, bridges: Bridges, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in bridges.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    atomic_write_json(out / META_FILE, meta)


def fit(sparse: GPT, dense: GPT, windows, out: Path, cfg: FitConfig, *, hashes: dict[str, str],
        resume: bool = False, progress=None) -> dict[str, Any]:  # fmt: skip
    """Fit bridges between frozen ``sparse`` and ``dense`` on windows drawn from ``windows`` (a
    :class:`~sparsecircuits.data.TokenStore`); writes to ``out`` and returns the metadata."""
    check_pair(sparse, dense)
    for m in (sparse, dense):
        m.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    bridges = Bridges(n_layer=sparse.config.n_layer, d_dense=dense.config.d_model,
                      d_sparse=sparse.config.d_model, k=cfg.k)  # fmt: skip
    opt = torch.optim.AdamW(bridges.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    step, ckpt = 0, out / CHECKPOINT_FILE
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        same = {k: v for k, v in state["config"].items() if k != "steps"}
        if same != cfg.model_dump(exclude={"steps"}) or state["hashes"] != hashes:
            raise InputError(f"{ckpt}: made with another config or other models; fit afresh")
        bridges.load_state_dict(state["bridges"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = json.loads(state["rng"])
        step = int(state["step"])
    parts: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    while step < cfg.steps:
        idx = torch.from_numpy(windows.sample_windows(rng, cfg.batch, cfg.seq_len)).long()
        loss, parts = fit_loss(sparse, dense, bridges, idx, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if progress is not None:
            progress(step, float(loss.detach()))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"bridges": bridges.state_dict(), "opt": opt.state_dict(), "step": step,
                     "rng": json.dumps(rng.bit_generator.state), "config": cfg.model_dump(),
                     "hashes": hashes}  # fmt: skip
            atomic_write(ckpt, lambda tmp, s=state: torch.save(s, tmp))
    meta = {"format": "sparsecircuits.bridges", "format_version": 1, "sites": bridges.sites,
            "d_dense": bridges.d_dense, "d_sparse": bridges.d_sparse, "k": cfg.k,
            "hashes": hashes, "config": cfg.model_dump(), "steps": step,
            "last_losses": parts, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    _save(out, bridges, meta)
    return meta


def load_bridges(directory: Path, *, hashes: dict[str, str]) -> Bridges:
    """Bridges written by :func:`fit`, refused (one line) when made for other models."""
    from safetensors.torch import load_file

    meta_path = Path(directory) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{meta_path}: cannot read bridge metadata ({err})") from None
    for role, h in hashes.items():
        if meta.get("hashes", {}).get(role) != h:
            raise InputError(f"{meta_path}: these bridges were fitted to another {role} model "
                             "(weights hash differs)")  # fmt: skip
    b = Bridges(n_layer=len(meta["sites"]) // 2, d_dense=meta["d_dense"],
                d_sparse=meta["d_sparse"], k=meta["k"])  # fmt: skip
    b.load_state_dict(load_file(Path(directory) / WEIGHTS_FILE))
    return b.eval()
