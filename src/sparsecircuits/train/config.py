"""Typed training configuration and the named presets (tiny / small / paper)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from sparsecircuits.errors import ConfigError
from sparsecircuits.model.config import GPTConfig, StrictModel


class SparsityConfig(StrictModel):
    """Weight sparsity: per-matrix top-k after every step, annealed from dense."""

    target_l0: float = 1 / 32  # final fraction of nonzeros in every sparse matrix (1.0 = dense)
    min_per_neuron: int = 4  # never leave an output row with fewer nonzeros
    anneal_start: float = 0.01  # fraction of training at which the anneal starts
    anneal_end: float = 0.5  # ... and reaches target_l0
    anneal: Literal["linear", "exponential"] = "linear"
    dense_embeddings: bool = False  # keep wte/wpe dense (official flag)
    dense_unembed: bool = False  # keep lm_head dense
    dense_biases: bool = False  # keep block biases dense
    # Weight gradient: "exact" = dense dW and a top-k projection every step (the paper);
    # "fast" = dW only on the current support, with a dense dW + projection (regrowth) every
    # `regrow_every` steps and on every step whose L0 budget changes (the anneal). The default
    # is fast: on the `small` preset its final validation loss was ~0.8% above exact mode's
    # (four seeds: +0.63% to +0.97% with the default regrow_tokens, +0.36% to +1.42% with
    # every token) at 1.3-1.9x the post-anneal tokens/s (docs/kernels.md).
    weight_grad: Literal["exact", "fast"] = "fast"
    regrow_every: int = 20
    # The regrowth steps' off-support weight gradients: "bf16" takes them from a bfloat16
    # product on CPUs that have one natively (~2x faster, ~3e-3 relative error in the regrowth
    # choice, that step's RMS factor and the moments of zero weights; the support's gradients
    # stay exact float32), "fp32" always computes them in float32 (docs/kernels.md).
    regrow_precision: Literal["fp32", "bf16"] = "bf16"
    # The share of each regrowth step's sequences whose products estimate the off-support
    # weight gradients (scaled up, their extra token noise taken off the RMS control; the
    # supports' gradients always use every token). The dense product is most of a regrowth
    # step's cost: 1/4 makes the d_model 1024 step ~2-6% faster, and on the `small` preset it
    # matched 1 over four seeds (+0.87% vs +0.85% over exact mode, docs/kernels.md).
    regrow_tokens: float = 0.25

    @model_validator(mode="after")
    def _check(self) -> SparsityConfig:
        if not 0.0 < self.target_l0 <= 1.0:
            raise ValueError(f"target_l0 must be in (0, 1], got {self.target_l0}")
        if not 0.0 <= self.anneal_start <= self.anneal_end <= 1.0:
            raise ValueError("need 0 <= anneal_start <= anneal_end <= 1")
        if self.min_per_neuron < 0:
            raise ValueError("min_per_neuron must be >= 0")
        if self.regrow_every < 1:
            raise ValueError("regrow_every must be >= 1")
        if not 0.0 < self.regrow_tokens <= 1.0:
            raise ValueError(f"regrow_tokens must be in (0, 1], got {self.regrow_tokens}")
        return self


class OptimConfig(StrictModel):
    """AdamW with the paper's settings and the sharkfin learning-rate schedule."""

    lr: float = 5e-3  # base learning rate (before warmup/decay and the sharkfin factor)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 0.1  # unusually large, as in the paper
    weight_decay: float = 0.1  # decoupled, on >= 2-D parameters
    # "normalize" rescales the gradient to RMS grad_rms every step (what the authors' code does
    # and what trained well here, see FEASIBILITY.md); "clip" only scales it down when above.
    grad_rms_mode: Literal["normalize", "clip", "none"] = "normalize"
    grad_rms: float = 1.0
    warmup_frac: float = 0.01  # linear warmup, then linear decay to 0
    sharkfin: bool = True  # multiply the LR by 1/sqrt(current L0 fraction)

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps < 0 or self.weight_decay < 0:
            raise ValueError("eps and weight_decay must be >= 0")
        if not self.grad_rms > 0:
            raise ValueError(f"grad_rms must be > 0, got {self.grad_rms}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        return self


class TrainConfig(StrictModel):
    """Everything a training run needs; saved as ``train_config.json`` in the run directory."""

    model: GPTConfig = GPTConfig()
    sparsity: SparsityConfig = SparsityConfig()
    optim: OptimConfig = OptimConfig()
    corpus: str = "stdlib"  # "stdlib", "python-env", a dir or glob of .py files, "hf:<path>"
    val_fraction: float = 0.02
    # A tokenizer file/dir or a shipped model's name to take it from; None trains one on the corpus.
    tokenizer: str | None = None
    tokenizer_vocab: int = 2048
    bigram_init: Literal["empirical", "zeros"] = "empirical"  # fill a fixed bigram table
    batch_size: int = 16  # global batch, in sequences of model.block_size tokens
    steps: int = 1000
    eval_every: int = 100
    eval_windows: int = 64  # validation windows of block_size tokens per evaluation
    log_every: int = 10
    checkpoint_every: int = 100
    # Also checkpoint at the first log step this many minutes after the last checkpoint: steps
    # run ~10x slower while the budget anneals from dense, so a step count alone cannot bound
    # the work a kill loses.
    checkpoint_minutes: float | None = None
    keep_checkpoints: int = 2
    # Every this many steps, keep a compact copy of the model (weights only, loadable by
    # load_model) in snapshots/step_N/: candidates for comparisons at matched loss.
    snapshot_every: int | None = None
    seed: int = 0
    # Matmul precision: "fp32" everywhere (CPU default; bit-reproducible); "tf32" lets CUDA
    # matmuls use TF32; "bf16" autocasts the forward to bfloat16 (CUDA; slow on most CPUs).
    # The loss is always computed in fp32.
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    # Stop at the first evaluation whose validation loss (nats/token over eval_windows windows)
    # is <= this, with a checkpoint and the final model saved there: a model matched in loss to
    # another (e.g. a dense baseline at the sparse model's loss). None trains all ``steps``.
    stop_at_val_loss: float | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in (
            "batch_size",
            "steps",
            "eval_every",
            "eval_windows",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ValueError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        if self.stop_at_val_loss is not None and not self.stop_at_val_loss > 0:
            raise ValueError(f"stop_at_val_loss must be > 0, got {self.stop_at_val_loss}")
        if self.snapshot_every is not None and self.snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {self.snapshot_every}")
        if self.checkpoint_every % self.log_every:
            # A resumed run restarts its log window at the checkpoint; aligned windows make its
            # metrics identical to an uninterrupted run's.
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every "
                f"({self.log_every})"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model.block_size


_TINY = dict(
    model=dict(n_layer=2, d_model=64, n_head=4, d_head=16, block_size=64),
    sparsity=dict(target_l0=1 / 8),
    optim=dict(lr=1e-2),
    batch_size=8,
    steps=60,
    eval_every=20,
    eval_windows=16,
    log_every=5,
    checkpoint_every=20,
)
_SMALL = dict(
    model=dict(n_layer=2, d_model=256, n_head=16, d_head=16, block_size=256),
    sparsity=dict(target_l0=1 / 32),
    optim=dict(lr=5e-3),
    batch_size=16,
    steps=1200,
    eval_every=100,
    eval_windows=64,
    checkpoint_every=100,
)
_PAPER = dict(
    model=dict(n_layer=8, d_model=2048, n_head=128, d_head=16, block_size=256),
    sparsity=dict(target_l0=1 / 1000),
    optim=dict(lr=1.28e-2),
    precision="bf16",
    batch_size=64,
    steps=100_000,
    eval_every=1000,
    eval_windows=256,
    checkpoint_every=1000,
)
PRESETS: dict[str, dict] = {"tiny": _TINY, "small": _SMALL, "paper": _PAPER}
Preset = Literal["tiny", "small", "paper"]


def preset_config(name: str, **overrides) -> TrainConfig:
    """The named preset with top-level ``overrides`` (nested dicts are merged)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    data = merge_overrides(PRESETS[name], overrides)
    return TrainConfig.from_dict(data, source=f"preset '{name}'")


def merge_overrides(base: dict, over: dict, *, _path: str = "") -> dict:
    """``over`` merged into ``base`` (nested dicts merge key by key)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        here = f"{_path}{k}"
        if isinstance(v, dict):
            sub = out.get(k, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"'{here}' is a value, not a section with fields")
            out[k] = merge_overrides(sub, v, _path=f"{here}.")
        elif isinstance(out.get(k), dict):
            raise ConfigError(f"'{here}' is a section; set its fields, e.g. {here}.FIELD=VALUE")
        else:
            out[k] = v
    return out
