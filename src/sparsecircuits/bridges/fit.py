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

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.init import init_lstsq
from sparsecircuits.bridges.losses import hybrid_d2s, hybrid_s2d, kl, nmse, residuals
from sparsecircuits.errors import InputError
from sparsecircuits.fileio import atomic_write, atomic_write_json
from sparsecircuits.model.config import GPTConfig
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
    # start from the least-squares maps (bridges/init.py) fitted on this many tokens
    init: Literal["lstsq", "random"] = "lstsq"
    init_tokens: int = Field(default=65536, ge=1)


def check_pair(sparse: GPT | GPTConfig, dense: GPT | GPTConfig) -> None:
    """The two models (or their configs) must share the layer count (the sites) and the
    vocabulary."""
    s, d = getattr(sparse, "config", sparse), getattr(dense, "config", dense)
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
    total = torch.zeros((), device=idx.device)
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
    """Weights, then metadata naming the weights' sha256: a pair torn by a kill between the
    two writes is refused on load, never mixed."""
    from safetensors.torch import save

    state = {k: v.detach().float().cpu().contiguous() for k, v in bridges.state_dict().items()}
    data = save(state)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: Path(tmp).write_bytes(data))
    atomic_write_json(out / META_FILE, {**meta, "weights_sha256": hashlib.sha256(data).hexdigest()})


def fit(sparse: GPT, dense: GPT, windows, out: Path, cfg: FitConfig, *, hashes: dict[str, str],
        resume: bool = False, progress=None) -> dict[str, Any]:  # fmt: skip
    """Fit bridges between frozen ``sparse`` and ``dense`` on windows drawn from ``windows`` (a
    :class:`~sparsecircuits.data.TokenStore`); writes to ``out`` and returns the metadata."""
    check_pair(sparse, dense)
    check_encoder_k(sparse.config, cfg.k)
    for m in (sparse, dense):
        m.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    bridges = Bridges(n_layer=sparse.config.n_layer, d_dense=dense.config.d_model,
                      d_sparse=sparse.config.d_model, k=cfg.k)  # fmt: skip
    ref = next(dense.parameters())
    bridges.to(device=ref.device, dtype=ref.dtype)  # the models' device and precision
    if cfg.init == "lstsq" and not (resume and (out / CHECKPOINT_FILE).exists()):
        init_lstsq(bridges, sparse, dense, windows, tokens=cfg.init_tokens,
                   seq_len=cfg.seq_len, seed=cfg.seed)  # fmt: skip
    opt = torch.optim.AdamW(bridges.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    step, ckpt = 0, out / CHECKPOINT_FILE
    parts: dict[str, list[float]] = {}
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        free = {"steps", "checkpoint_every"}  # may change between sessions
        now = cfg.model_dump(exclude=free)
        differ = [k for k, v in now.items() if state["config"].get(k) != v]
        differ += [f"the {r} model" for r in hashes if state["hashes"].get(r) != hashes[r]]
        if differ:
            raise InputError(f"{ckpt}: made with another {', '.join(differ)}; fit afresh")
        if int(state["step"]) > cfg.steps:
            raise InputError(f"--steps {cfg.steps}: the checkpoint is already at step "
                             f"{state['step']}")  # fmt: skip
        bridges.load_state_dict(state["bridges"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = json.loads(state["rng"])
        step, parts = int(state["step"]), json.loads(state.get("last_losses", "{}"))
    t0 = time.perf_counter()
    while step < cfg.steps:
        idx = torch.from_numpy(windows.sample_windows(rng, cfg.batch, cfg.seq_len)).long()
        idx = idx.to(ref.device)
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
                     "hashes": hashes, "last_losses": json.dumps(parts)}  # fmt: skip
            atomic_write(ckpt, lambda tmp, s=state: torch.save(s, tmp))
    meta = bridge_meta(bridges, hashes=hashes, config=cfg.model_dump(), steps=step,
                       last_losses=parts, seconds=time.perf_counter() - t0)  # fmt: skip
    _save(out, bridges, meta)
    return meta


def check_encoder_k(sparse: GPTConfig, k: int | None) -> None:
    """A sparse model whose residual stream is AbsTopK-sparse needs the encoder's keep-count."""
    raw = sparse.afrac_loctypes or ()
    locs = set(raw.split(",") if isinstance(raw, str) else raw)
    if k is None and sparse.afrac and locs & {"resid_post_attn", "resid_post_mlp"}:
        raise InputError("k: the sparse model's residual stream is AbsTopK-sparse; give the "
                         "encoder's keep-count")  # fmt: skip


def bridge_meta(bridges: Bridges, *, hashes: dict[str, str], config: dict[str, Any], steps: int,
                last_losses: dict[str, Any], seconds: float) -> dict[str, Any]:  # fmt: skip
    """``bridges.json``'s content (before :func:`_save` adds the weights' sha256): the format,
    the sites and sizes, both models' weights hashes, the config that made them."""
    return {"format": "sparsecircuits.bridges", "format_version": 1, "sites": bridges.sites,
            "d_dense": bridges.d_dense, "d_sparse": bridges.d_sparse, "k": bridges.k,
            "hashes": hashes, "config": config, "steps": steps, "last_losses": last_losses,
            "seconds": round(seconds, 1)}  # fmt: skip


class BridgeMeta(BaseModel):
    """``bridges.json``, validated on load."""

    model_config = ConfigDict(extra="allow")
    format: Literal["sparsecircuits.bridges"]
    format_version: Literal[1]
    sites: list[str]
    d_dense: int = Field(ge=1)
    d_sparse: int = Field(ge=1)
    k: int | None
    hashes: dict[str, str]
    weights_sha256: str


def shipped_bridges() -> list[str]:
    """Names of the bridges shipped with the package (``sparsecircuits/pretrained/NAME``)."""
    from sparsecircuits.model.io import PRETRAINED_ROOT

    if not PRETRAINED_ROOT.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_ROOT.iterdir() if (p / META_FILE).exists())


def is_shipped(directory: Path) -> bool:
    """Whether ``directory`` is inside the package's shipped files (not to be rewritten)."""
    from sparsecircuits.model.io import PRETRAINED_ROOT

    return Path(directory).resolve().is_relative_to(PRETRAINED_ROOT.resolve())


def resolve_bridges_dir(spec: str | Path) -> Path:
    """A bridges directory from a path or the name of shipped bridges (``stdlib-bridges``)."""
    from sparsecircuits.model.io import PRETRAINED_ROOT

    path = Path(spec)
    if path.is_dir():
        return path
    if str(spec) in shipped_bridges():
        return PRETRAINED_ROOT / str(spec)
    known = ", ".join(shipped_bridges()) or "none installed"
    raise InputError(f"{spec}: no such bridges directory or shipped bridges (shipped: {known})")


def load_meta(directory: Path) -> BridgeMeta:
    """``bridges.json`` of a bridges directory, validated; one line if missing or malformed."""
    from pydantic import ValidationError

    from sparsecircuits.model.config import format_validation_error

    meta_path = Path(directory) / META_FILE
    try:
        return BridgeMeta.model_validate_json(meta_path.read_bytes())
    except OSError as err:
        raise InputError(f"{err.filename}: cannot read ({err.strerror})") from None
    except ValidationError as err:
        raise InputError(format_validation_error(err, source=str(meta_path))) from None


def load_bridges(directory: Path, *, hashes: dict[str, str]) -> Bridges:
    """Bridges written by :func:`fit`; refused in one line when made for other models, torn
    (weights and metadata from different fits) or unreadable."""
    from safetensors.torch import load

    meta_path, w_path = Path(directory) / META_FILE, Path(directory) / WEIGHTS_FILE
    meta = load_meta(directory)
    try:
        data = w_path.read_bytes()
    except OSError as err:
        raise InputError(f"{err.filename}: cannot read ({err.strerror})") from None
    for role, h in hashes.items():
        if meta.hashes.get(role) != h:
            raise InputError(f"{meta_path}: these bridges were fitted to another {role} model "
                             "(weights hash differs)")  # fmt: skip
    if hashlib.sha256(data).hexdigest() != meta.weights_sha256:
        raise InputError(f"{w_path}: not the weights {META_FILE} describes (a torn write?)")
    b = Bridges(n_layer=len(meta.sites) // 2, d_dense=meta.d_dense, d_sparse=meta.d_sparse,
                k=meta.k)  # fmt: skip
    if b.sites != meta.sites:
        raise InputError(f"{meta_path}: sites {meta.sites} are not a bridge's")
    try:
        b.load_state_dict(load(data))
    except Exception as err:  # safetensors' error type differs by version
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{w_path}: does not fit the sizes in {META_FILE} ({first})") from None
    return b.eval().requires_grad_(False)
