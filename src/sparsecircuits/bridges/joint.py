"""Joint training of a new weight-sparse model with bridges to a frozen dense model
(``bridge train``; Gao et al. 2025, section 6).

Loss per batch (x, y) (B, T), every bridge site i (coefficients in :class:`JointConfig`)::

    coef_lm   * CE(sparse(x), y)
  + coef_nmse * sum_i [NMSE(f_i(h_dense_i), h_sparse_i) + NMSE(g_i(h_sparse_i), h_dense_i)]
  + coef_kl   * sum_i [KL(dense || d->s hybrid from i) + KL(dense || s->d hybrid from i)]

The dense model is frozen; the sparse model and the bridges train. The encoder's target is
detached (the encoder chases the sparse residual, not the reverse); the decoder's input and
the s->d hybrid's are not, so the sparse model is also pulled toward a residual the dense
model can read. Residuals are those at the hook sites (after the residual AbsTopK, as
``bridge fit`` and ``bridge eval`` use them). Three passes per step: the dense model alone (no
graph), the sparse model once on the batch stacked 2L+2 deep (the plain pass for the LM loss
and the residuals, and every site's d->s hybrid), the dense model once stacked 2L+1 deep
(every s->d hybrid): see :func:`~sparsecircuits.bridges.losses.stacked_pass`.

The run is a normal training run (the trainer, its fast kernels, annealed L0, checkpoints,
``--resume``, torchrun) with a :class:`JointObjective` plugged in. Beside the trainer's files:
``bridge_config.json`` (this config and the dense model's weights hash; a resume under other
settings is refused naming the field) and ``bridges/`` (``bridges.safetensors`` +
``bridges.json`` as ``bridge fit`` writes them, bound to the dense model's and the sparse
model's weights hashes) in every checkpoint and in the run directory after the final model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import model_validator
from torch import nn

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.fit import _save, bridge_meta, check_encoder_k, check_pair
from sparsecircuits.bridges.losses import kl, nmse, residuals, stacked_pass
from sparsecircuits.errors import ConfigError, InputError
from sparsecircuits.fileio import atomic_write_json, read_json_object
from sparsecircuits.kernels import cross_entropy
from sparsecircuits.model.config import StrictModel
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import load_model, resolve_model_dir, weights_hash
from sparsecircuits.train.config import TrainConfig
from sparsecircuits.train.trainer import Trainer

JOINT_CONFIG_FILE = "bridge_config.json"
BRIDGES_DIR = "bridges"
TERMS = ("lm_loss", "enc_nmse", "dec_nmse", "kl_d2s", "kl_s2d")  # the metrics log's keys


class JointConfig(StrictModel):
    """The bridge side of a joint run (validated; unknown fields are an error)."""

    coef_lm: float = 1.0  # next-token loss of the sparse model
    coef_nmse: float = 1.0  # encoder + decoder NMSE, summed over sites
    coef_kl: float = 1.0  # both hybrid KLs (nats/token), summed over sites
    k: int | None = None  # encoder AbsTopK keep-count (None: dense encoder output)
    # The bridges' AdamW learning rate (constant, no weight decay). They must keep pace with the
    # sparse model (its own base rate ~1e-2): on a tiny run (200 steps, d_model 32/48) 1e-3 left
    # the encoder NMSE in the thousands and 3e-3 in the tens where 1e-2 brought it below 2.
    bridge_lr: float = 1e-2

    @model_validator(mode="after")
    def _check(self) -> JointConfig:
        for name in ("coef_lm", "coef_nmse", "coef_kl"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.coef_lm + self.coef_nmse + self.coef_kl > 0:
            raise ValueError("coef_lm, coef_nmse and coef_kl are all 0: nothing to train")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.bridge_lr > 0:
            raise ValueError(f"bridge_lr must be > 0, got {self.bridge_lr}")
        return self


def joint_loss(sparse: GPT, dense: GPT, bridges: Bridges, x: torch.Tensor, y: torch.Tensor,
               cfg: JointConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """(loss, {term: value}) of one batch: ``x``, ``y`` (B, T) int64; the terms (:data:`TERMS`)
    are before their coefficients, each summed over sites; the hybrid terms are skipped
    (absent) when ``coef_kl`` is 0, the NMSE terms when ``coef_nmse`` is 0."""
    sites = bridges.sites
    with torch.no_grad():  # frozen: its logits and residuals are targets and inputs
        dense_logits, hd = residuals(dense, x, sites)
    hybrid = cfg.coef_kl > 0
    enc = {s: bridges[s].encode(hd[s]) for s in sites}
    logits, hs = stacked_pass(sparse, x, enc if hybrid else {}, plain=sites)
    parts = {"lm_loss": cross_entropy(logits[-1].float().flatten(0, 1), y.flatten())}
    dec = {s: bridges[s].decode(hs[s]) for s in sites} if cfg.coef_nmse or hybrid else {}
    if cfg.coef_nmse > 0:
        parts["enc_nmse"] = sum(nmse(enc[s], hs[s].detach()) for s in sites)
        parts["dec_nmse"] = sum(nmse(dec[s], hd[s]) for s in sites)
    if hybrid:
        s2d = stacked_pass(dense, x, dec)[0]
        parts["kl_d2s"] = sum(kl(dense_logits, logits[i]) for i in range(len(sites)))
        parts["kl_s2d"] = sum(kl(dense_logits, s2d[i]) for i in range(len(sites)))
    coef = {"lm_loss": cfg.coef_lm, "enc_nmse": cfg.coef_nmse, "dec_nmse": cfg.coef_nmse,
            "kl_d2s": cfg.coef_kl, "kl_s2d": cfg.coef_kl}  # fmt: skip
    return sum(coef[k] * v for k, v in parts.items()), parts


class JointObjective:
    """The trainer's :class:`~sparsecircuits.train.objective.Objective` for joint training:
    owns the bridges (created in :meth:`bind`, seeded by ``seed``, on the model's device and
    dtype) and their AdamW, and holds the frozen ``dense`` model (moved to that device)."""

    def __init__(self, dense: GPT, cfg: JointConfig, *, dense_hash: str, seed: int = 0) -> None:
        self.dense, self.cfg, self.dense_hash, self.seed = dense, cfg, dense_hash, seed
        self.bridges: Bridges | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.steps = 0  # bridge optimiser steps, over every resume
        self.last: dict[str, float] = {}  # the terms' means over the last metrics window
        self._sums: dict[str, torch.Tensor] = {}  # on the device: no sync per step
        self._count = 0
        self._t0 = time.perf_counter()

    def bind(self, model: GPT) -> None:
        check_pair(model, self.dense)
        check_encoder_k(model.config, self.cfg.k)
        ref = next(model.parameters())
        self.dense.to(device=ref.device).eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the run's own RNG stream stays untouched
            torch.manual_seed(self.seed)
            bridges = Bridges(n_layer=model.config.n_layer, d_dense=self.dense.config.d_model,
                              d_sparse=model.config.d_model, k=self.cfg.k)  # fmt: skip
        self.bridges = bridges.to(device=ref.device, dtype=ref.dtype)
        params = self.bridges.parameters()
        self.opt = torch.optim.AdamW(params, lr=self.cfg.bridge_lr, weight_decay=0.0)

    def loss(self, model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total, parts = joint_loss(model, self.dense, self._bound(), x, y, self.cfg)
        for k, v in parts.items():
            self._sums[k] = self._sums[k] + v.detach() if k in self._sums else v.detach()
        self._count += 1
        return total

    def parameters(self) -> list[nn.Parameter]:
        return list(self._bound().parameters())

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        if self._count:
            self.last = {k: float(v) / self._count for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"bridges": self._bound().state_dict(), "opt": self.opt.state_dict(),
                "steps": self.steps, "last": dict(self.last), "dense_hash": self.dense_hash,
                "config": self.cfg.model_dump()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # bridge_config.json is checked first; this guards a checkpoint copied between runs
        if state["dense_hash"] != self.dense_hash or state["config"] != self.cfg.model_dump():
            raise ValueError("the checkpoint's bridges belong to another dense model or config")
        self._bound().load_state_dict(state["bridges"])
        self.opt.load_state_dict(state["opt"])
        self.steps, self.last = int(state["steps"]), dict(state["last"])

    def save(self, directory: Path, model: GPT) -> None:
        hashes = {"sparse": weights_hash(model), "dense": self.dense_hash}
        config = {"mode": "joint", **self.cfg.model_dump()}
        seconds = time.perf_counter() - self._t0  # this session's
        meta = bridge_meta(self._bound(), hashes=hashes, config=config, steps=self.steps,
                           last_losses=self.last, seconds=seconds)  # fmt: skip
        _save(Path(directory) / BRIDGES_DIR, self._bound(), meta)

    def _bound(self) -> Bridges:
        if self.bridges is None:
            raise RuntimeError("JointObjective.bind(model) must be called first")
        return self.bridges


def joint_trainer(cfg: TrainConfig, joint: JointConfig, *, dense: str | Path,
                  run_dir: str | Path, device: str = "auto", cache_dir: str | Path | None = None,
                  resume: bool = False) -> Trainer:  # fmt: skip
    """A :class:`Trainer` for ``cfg`` with a :class:`JointObjective` to the dense model
    ``dense`` (a directory, run or shipped name). The sparse model takes the dense model's
    tokenizer (``cfg.tokenizer`` None is set to it; another is refused). Refuses, in one line
    and before anything is written: a pair the bridges cannot join (layer count, vocabulary,
    context), and on resume a changed :class:`JointConfig` field or dense model. Writes
    ``bridge_config.json`` on a fresh start (rank 0). Call ``.run()`` on the result."""
    from sparsecircuits.data import Tokenizer

    dense_dir = resolve_model_dir(dense).resolve()
    dense_model, dtok = load_model(dense_dir), Tokenizer.load(dense_dir)
    if cfg.tokenizer is None:
        cfg = cfg.replace(tokenizer=str(dense_dir))
    spec = cfg.tokenizer
    tok = Tokenizer.load(spec if Path(spec).exists() else resolve_model_dir(spec))
    if tok.fingerprint() != dtok.fingerprint():
        raise InputError(f"tokenizer {spec}: not the dense model's ({dense}); leave it unset")
    check_pair(cfg.model.replace(vocab_size=tok.vocab_size), dense_model)
    check_encoder_k(cfg.model, joint.k)
    if cfg.model.block_size > dense_model.config.block_size:
        raise InputError(f"model.block_size {cfg.model.block_size}: longer than the dense "
                         f"model's context ({dense_model.config.block_size})")  # fmt: skip
    h = weights_hash(dense_model)
    objective = JointObjective(dense_model, joint, dense_hash=h, seed=cfg.seed)
    trainer = Trainer(cfg, run_dir=run_dir, device=device, cache_dir=cache_dir, resume=resume,
                      objective=objective)  # fmt: skip
    path = Path(run_dir) / JOINT_CONFIG_FILE
    if resume:
        saved = read_joint_config(run_dir)
        differ = [f"{k} (was {getattr(saved, k)}, now {v})"
                  for k, v in joint.model_dump().items() if getattr(saved, k) != v]  # fmt: skip
        if read_json_object(path).get("dense_weights_hash") != h:
            differ.append("dense model (its weights hash differs)")
        if differ:
            raise ConfigError(f"{path}: the run was started with another {'; '.join(differ)}; "
                              "resume without changing options")  # fmt: skip
    elif trainer.dist.is_main:
        atomic_write_json(path, {"joint": joint.model_dump(), "dense": str(dense_dir),
                                 "dense_weights_hash": h})  # fmt: skip
    return trainer


def read_joint_config(run_dir: str | Path) -> JointConfig:
    """The :class:`JointConfig` a joint run was started with; one line if it has none."""
    path = Path(run_dir) / JOINT_CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{run_dir}: no {JOINT_CONFIG_FILE}; not a joint bridge training run")
    return JointConfig.from_dict(read_json_object(path).get("joint"), source=str(path))
