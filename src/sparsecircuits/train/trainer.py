"""The training loop: AdamW + sharkfin LR + annealed top-k weight projection, with atomic
checkpoints, exact resume, JSONL metrics and torchrun data parallelism."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsecircuits.data import Tokenizer, TokenStore
from sparsecircuits.data.tokenizer import TOKENIZER_FILE
from sparsecircuits.errors import CheckpointError, ConfigError, DataError
from sparsecircuits.fileio import atomic_dir, atomic_write_json, cache_root, read_json_object
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import SPARSITY_FILE, save_model
from sparsecircuits.model.sparsity import WeightSparsity, sparse_parameter_names
from sparsecircuits.train import distributed as D
from sparsecircuits.train.bigram import bigram_log_probs
from sparsecircuits.train.checkpoint import (
    SNAPSHOTS,
    TrainState,
    remove_stale_temps,
    restore_latest,
    save_checkpoint,
    save_snapshot,
)
from sparsecircuits.train.config import TrainConfig
from sparsecircuits.train.metrics import MetricsLog, evaluate
from sparsecircuits.train.objective import Objective, objective_metrics
from sparsecircuits.train.optim import build_optimizer
from sparsecircuits.train.run_data import build_run_data
from sparsecircuits.train.schedule import l0_fraction, lr_at, regrows
from sparsecircuits.train.step import StepMode, train_step
from sparsecircuits.train.support_adamw import SupportAdamW

log = logging.getLogger(__name__)


CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "model"
DATA_FILE = "data.json"  # fingerprints of the corpus and tokenizer the run trains on
RUN_ARTIFACTS = (CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE, DATA_FILE, FINAL_DIR, "checkpoints",
                 SNAPSHOTS)  # fmt: skip


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    tokens: int
    val_loss: float  # nats/token on the validation windows of the last evaluation
    seconds: float  # wall-clock of this invocation
    total_seconds: float  # training wall-clock summed over every resume


def default_cache_dir() -> Path:
    return cache_root()


class Trainer:
    """Train ``cfg`` into ``run_dir``. ``resume=True`` continues from the newest checkpoint.
    ``objective``: another loss and extra parameters (:mod:`sparsecircuits.train.objective`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        run_dir: str | Path,
        device: str = "auto",
        cache_dir: str | Path | None = None,
        resume: bool = False,
        objective: Objective | None = None,
    ) -> None:
        self.cfg = cfg
        self.objective = objective
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.resume = resume
        self.dist, self.device = D.init_distributed(D.resolve_device(device))
        if cfg.precision == "tf32" and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(
                f"batch_size {cfg.batch_size} is not divisible by the "
                f"{self.dist.world_size} processes"
            )
        self._check_run_dir()

    # ------------------------------------------------------------------------------ set-up
    def _check_run_dir(self) -> None:
        saved = self.run_dir / CONFIG_FILE
        if self.resume:
            if not saved.exists():
                raise ConfigError(f"{self.run_dir}: nothing to resume ({CONFIG_FILE} not found)")
            if TrainConfig.from_json_file(saved) != self.cfg:
                raise ConfigError(
                    f"{saved}: the run was started with a different config; "
                    "resume without changing options"
                )
        else:
            # Any artifact of an earlier run would be mixed into this one (old checkpoints
            # outrank new ones on resume, an old tokenizer would be paired with new weights).
            leftovers = [n for n in RUN_ARTIFACTS if (self.run_dir / n).exists()]
            if leftovers:
                raise ConfigError(
                    f"{self.run_dir}: already holds a run ({', '.join(leftovers)}); pass "
                    "--resume to continue it or choose another output directory"
                )

    def _prepare_data(self) -> tuple[Tokenizer, TokenStore, TokenStore, dict[str, Any]]:
        """Tokenizer, token caches and data fingerprints; rank 0 builds them first so ranks
        never race. Checks both splits hold a full window and, on resume, that the data is
        the data the run started with."""
        for turn in ("main", "others"):
            if (turn == "main") == self.dist.is_main:
                tok, train, val, data = self._build_data()
            D.barrier(self.dist)
        window = self.cfg.model.block_size + 1
        for store in (train, val):
            if store.num_windows(window) < 1:
                raise DataError(
                    f"corpus '{self.cfg.corpus}': the {store.split} split has "
                    f"{store.num_tokens} tokens, fewer than one window of {window}"
                )
        saved = self.run_dir / DATA_FILE
        if self.resume and saved.exists():
            before = read_json_object(saved)
            if before.get("corpus_fingerprint") != data["corpus_fingerprint"]:
                raise DataError(
                    f"{saved}: corpus '{self.cfg.corpus}' changed since the run started "
                    "(different files or contents); resume needs the same data"
                )
        return tok, train, val, data

    def _write_run_files(self, tok: Tokenizer, data: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume or not (self.run_dir / TOKENIZER_FILE).exists():
            tok.save(self.run_dir)
        if not self.resume:
            atomic_write_json(self.run_dir / CONFIG_FILE, self.cfg.model_dump(mode="json"))
        if not (self.run_dir / DATA_FILE).exists():
            atomic_write_json(self.run_dir / DATA_FILE, data)

    def _build_data(self) -> tuple[Tokenizer, TokenStore, TokenStore, dict[str, Any]]:
        return build_run_data(self.cfg, self.run_dir, self.cache_dir, resume=self.resume)

    def _build_model(self, tok: Tokenizer, train: TokenStore) -> GPT:
        mcfg = self.cfg.model
        if mcfg.vocab_size != tok.vocab_size:
            mcfg = mcfg.replace(vocab_size=tok.vocab_size)
        torch.manual_seed(self.cfg.seed)
        model = GPT(mcfg)
        fixed_table = mcfg.enable_bigram_table and not mcfg.learnable_bigram_table
        if fixed_table and self.cfg.bigram_init == "empirical":
            model.bigram_table.copy_(bigram_log_probs(train, vocab_size=mcfg.vocab_size))
        return model.to(self.device)

    def build_model(self) -> tuple[GPT, Tokenizer]:
        """The run's model as initialised (its bigram table filled from the data) and its
        tokenizer; on resume, checks the data is the data the run started with."""
        tok, train, _, _ = self._prepare_data()
        return self._build_model(tok, train), tok

    # -------------------------------------------------------------------------------- loop
    def run(self, *, on_record: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        """Train to ``cfg.steps``; calls ``on_record`` with every metrics record."""
        cfg, dev = self.cfg, self.device
        main = self.dist.is_main
        # Everything that can fail on bad input runs before the run directory is written.
        tok, train, val, data = self._prepare_data()
        model = self._build_model(tok, train)
        if self.objective is not None:
            self.objective.bind(model)
        sp = cfg.sparsity
        names = sparse_parameter_names(
            model,
            dense_embeddings=sp.dense_embeddings,
            dense_unembed=sp.dense_unembed,
            dense_biases=sp.dense_biases,
        )
        sparsity = WeightSparsity(model, names, min_per_neuron=sp.min_per_neuron)
        optimizer = build_optimizer(model, cfg.optim)
        if main:
            self._write_run_files(tok, data)
        metrics = MetricsLog(self.run_dir / METRICS_FILE, enabled=main)

        state = TrainState(step=0, tokens=0)
        if main and remove_stale_temps(self.run_dir):
            log.info("removed unfinished files left by an interrupted run")
        restored = (
            restore_latest(self.run_dir, model=model, optimizer=optimizer, objective=self.objective)
            if (self.resume)
            else None
        )
        if restored is not None:
            state = restored[1]
            log.info("resumed from %s (step %d)", restored[0], state.step)
        elif self.resume and (self.run_dir / FINAL_DIR).exists():
            raise CheckpointError(
                f"{self.run_dir}: the run has a final model but no checkpoint to resume from; "
                "it is finished (retraining would overwrite it)"
            )
        metrics.truncate_after(state.step)

        local = cfg.batch_size // self.dist.world_size
        lo = self.dist.rank * local
        t_start, window_loss, window_steps, window_time = time.time(), 0.0, 0, 0.0
        last_checkpoint_t = t_start
        elapsed_before = state.elapsed_s
        val_loss = math.nan
        support_opt = SupportAdamW(optimizer) if sp.weight_grad == "fast" else None
        if support_opt is not None and state.step > 0:  # resumed: the supports in effect
            sparsity.adopt_supports_(l0_fraction(state.step - 1, cfg.steps, sp))
            sparsity.grad_shares = dict(state.grad_shares)
        model.train()
        end = cfg.steps
        if state.step and self._stops(_last_val_loss(metrics)):
            log.info("the run had stopped at stop_at_val_loss (step %d): not training", state.step)
            end = state.step
        for step in range(state.step, end):
            t0 = time.perf_counter()
            frac = l0_fraction(step, cfg.steps, sp)
            lr = lr_at(step, cfg.steps, cfg.optim, frac)
            mode: StepMode = "exact"
            if support_opt is not None:
                mode = "regrow" if regrows(step, cfg.steps, sp) else "support"
            x, y = self._batch(train, step, lo, local)
            loss, grad_rms = train_step(
                model,
                optimizer,
                sparsity,
                x,
                y,
                lr=lr,
                frac=frac,
                mode=mode,
                support_opt=support_opt,
                optim=cfg.optim,
                dist=self.dist,
                precision=cfg.precision,
                regrow_precision=sp.regrow_precision,
                regrow_tokens=sp.regrow_tokens,
                objective=self.objective,
            )
            loss_val = self._global_mean(loss)
            state = TrainState(
                step=step + 1,
                tokens=state.tokens + cfg.tokens_per_step,
                elapsed_s=elapsed_before + time.time() - t_start,
                grad_shares=dict(sparsity.grad_shares),
            )
            window_time += time.perf_counter() - t0
            window_loss += loss_val
            window_steps += 1

            do_eval = state.step % cfg.eval_every == 0 or state.step == cfg.steps
            if state.step % cfg.log_every == 0 or do_eval:
                rec: dict[str, Any] = {
                    "step": state.step,
                    "tokens": state.tokens,
                    "train_loss": window_loss / window_steps,
                    "lr": lr,
                    "l0_frac": frac,
                    "grad_rms": grad_rms,
                    "tokens_per_s": window_steps * cfg.tokens_per_step / max(window_time, 1e-9),
                    "elapsed_s": state.elapsed_s,
                }
                window_loss, window_steps, window_time = 0.0, 0, 0.0
                rec.update(objective_metrics(self.objective, self.dist, dev))
                if do_eval:
                    ev = evaluate(
                        model, val, windows=cfg.eval_windows, batch_size=local, device=dev
                    )
                    val_loss = ev["val_loss"]
                    rec.update(ev)
                    rec["l0"] = {r.name: r.nonzero for r in sparsity.report(frac)}
                metrics.write(rec)
                if on_record is not None and main:
                    on_record(rec)
            last = state.step == cfg.steps or (do_eval and self._stops(val_loss))
            checkpoint = (
                state.step % cfg.checkpoint_every == 0
                or last
                or self._checkpoint_due(
                    state.step, time.time() - last_checkpoint_t, fast=support_opt is not None
                )
            )
            if checkpoint and support_opt is not None:  # no deferred work in a checkpoint
                support_opt.catch_up({id(sparsity.params[n]): m for n, m in sparsity.masks.items()})
            if main and checkpoint:
                save_checkpoint(
                    self.run_dir,
                    model=model,
                    optimizer=optimizer,
                    state=state,
                    tokenizer_file=self.run_dir / TOKENIZER_FILE,
                    keep=cfg.keep_checkpoints,
                    objective=self.objective,
                )
            if checkpoint:
                last_checkpoint_t = time.time()
            if main and cfg.snapshot_every and state.step % cfg.snapshot_every == 0:
                save_snapshot(
                    self.run_dir,
                    model=model,
                    step=state.step,
                    tokenizer_file=self.run_dir / TOKENIZER_FILE,
                    sparsity=sp.model_dump(mode="json"),
                )
            if last and state.step < cfg.steps:
                log.info(
                    "stopping at step %d of %d: validation loss %.4f <= stop_at_val_loss %.4f",
                    state.step, cfg.steps, val_loss, cfg.stop_at_val_loss,
                )  # fmt: skip
                break

        final = self.run_dir / FINAL_DIR
        if main:
            with atomic_dir(final) as tmp:
                save_model(model, tmp)
                shutil.copyfile(self.run_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
                atomic_write_json(tmp / SPARSITY_FILE, sp.model_dump(mode="json"))
            if self.objective is not None:  # after the model: a kill between the two resumes
                self.objective.save(self.run_dir, model)
            if math.isnan(val_loss):  # resumed after the last step: report the saved result
                val_loss = _last_val_loss(metrics)
        D.barrier(self.dist)
        return TrainResult(self.run_dir, final, state.step, state.tokens, val_loss,
                           time.time() - t_start, state.elapsed_s)  # fmt: skip

    def _stops(self, val_loss: float) -> bool:
        """Whether ``val_loss`` (nats/token) meets ``stop_at_val_loss`` (never when unset)."""
        return self.cfg.stop_at_val_loss is not None and val_loss <= self.cfg.stop_at_val_loss

    def _checkpoint_due(self, step: int, since_s: float, *, fast: bool) -> bool:
        """Whether ``checkpoint_minutes`` have passed since the last checkpoint, at a log step
        (so a resumed run's log windows line up). Rank 0's clock decides for every rank.

        In the fast mode only before a regrowth step: a checkpoint brings the deferred moment
        decay up to date, which a regrowth step does anyway, so the run's arithmetic (and its
        result) does not depend on when the clock said to checkpoint."""
        minutes = self.cfg.checkpoint_minutes
        if minutes is None or step % self.cfg.log_every:
            return False
        if fast and not regrows(step, self.cfg.steps, self.cfg.sparsity):
            return False
        due = float(since_s >= minutes * 60)
        if self.dist.enabled:
            due = D.mean_over_ranks([due if self.dist.is_main else 0.0], self.dist, self.device)[0]
            return due > 0
        return bool(due)

    def _batch(
        self, store: TokenStore, step: int, lo: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of ``step`` is a pure function of (seed, step); take our slice."""
        rng = np.random.default_rng([self.cfg.seed, step])
        windows = store.sample_windows(rng, self.cfg.batch_size, self.cfg.model.block_size + 1)
        xy = torch.from_numpy(windows[lo : lo + n]).to(self.device)
        return xy[:, :-1], xy[:, 1:]

    def _global_mean(self, value: float) -> float:
        if not self.dist.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.dist.world_size


def _last_val_loss(metrics: MetricsLog) -> float:
    for rec in reversed(metrics.read()):
        if "val_loss" in rec:
            return float(rec["val_loss"])
    return math.nan


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The ``train_config.json`` of an existing run."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{run_dir}: no {CONFIG_FILE}; not a training run directory")
    return TrainConfig.from_json_file(path)


__all__ = ["TrainResult", "Trainer", "default_cache_dir", "read_run_config", "train_step"]
