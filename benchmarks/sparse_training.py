"""Training-step and inference throughput: masked-dense vs the CSR kernels, same process.

The model is the paper's architecture (RMSNorm, d_head 16, AbsTopK 1/4 at the 8 node
locations, attention sink, bigram table), 2 layers, context 256, batch 16 (4096 tokens/step),
on random tokens. Variants, timed round-robin (medians):

- ``masked-dense``: dense matmuls on zero-masked weights, AbsTopK by torch.topk + scatter
  (also after the GELU), the projection by torch.topk every step. It shares everything that
  is not about sparsity with ours (the attention, RMSNorm, loss and logit-table kernels), so
  the ratio is what weight and activation sparsity buy, not what those kernels buy
  (``dense_parts.py`` times them against torch);
- ``ours exact``: the CSR kernels below the measured crossover, fast AbsTopK and projection,
  dense weight gradients every step (the paper's exact top-k training);
- ``ours fast``: the same with support-only weight gradients and AdamW on the supports, a
  regrowth step every ``regrow_every`` steps (the default, 20: timed as 1 regrowth + 19
  support steps) at the default ``regrow_precision`` and ``regrow_tokens``: the trainer's
  ``weight_grad: fast`` path, on its own copy of the model. ``--regrow-every R`` adds a
  ``fast R=R`` row: the same with another interval; ``--regrow-tokens S`` a ``fast tok=S``
  row: the default interval with the regrowth products on a share S of the sequences (trades
  of loss for speed measured in ``docs/kernels.md``).

    python benchmarks/sparse_training.py [--widths 256,1024] [--rounds 3] [--inference]
                                         [--regrow-every 40] [--regrow-tokens 0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from sparsecircuits._alloc import tune_allocator

tune_allocator()

import torch  # noqa: E402
from _timing import machine  # noqa: E402

import sparsecircuits.model.layers as layers  # noqa: E402
import sparsecircuits.model.sparsity as sparsity_mod  # noqa: E402
from sparsecircuits.kernels.crossover import ENV as SPARSE_BELOW  # noqa: E402
from sparsecircuits.model import (  # noqa: E402
    GPT,
    GPTConfig,
    WeightSparsity,
    sparse_parameter_names,
)
from sparsecircuits.train.config import OptimConfig, SparsityConfig  # noqa: E402
from sparsecircuits.train.optim import build_optimizer  # noqa: E402
from sparsecircuits.train.support_adamw import SupportAdamW  # noqa: E402
from sparsecircuits.train.trainer import train_step  # noqa: E402

SPARSITY = SparsityConfig()  # the trainer's defaults: regrowth interval and precision
L0S = {"1": 1.0, "1/16": 1 / 16, "1/64": 1 / 64, "1/256": 1 / 256}
_FAST_ABSTOPK = layers.abstopk
_FAST_ABSTOPK_ = layers.abstopk_
_FAST_GELU_ABSTOPK = layers.gelu_abstopk
_FAST_PROJECT = sparsity_mod.project_topk_


def _legacy_abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


@torch.no_grad()
def _legacy_project(w: torch.Tensor, k: int, *, min_per_neuron: int) -> torch.Tensor:
    if k >= w.numel():
        return torch.ones_like(w, dtype=torch.bool)
    score = w.abs()
    j = sparsity_mod.row_floor(w.shape, k, min_per_neuron=min_per_neuron)
    if j > 0:
        score.scatter_(1, score.topk(j, dim=1, sorted=False).indices, torch.inf)
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[score.view(-1).topk(k, sorted=False).indices] = True
    mask = mask.view_as(w)
    w.mul_(mask)
    return mask


def _legacy_gelu_abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    return _legacy_abstopk(torch.nn.functional.gelu(x), k)


def use_path(name: str) -> None:
    """Switch the code path: 'masked-dense' restores the pre-kernel implementation."""
    legacy = name == "masked-dense"
    layers.abstopk = _legacy_abstopk if legacy else _FAST_ABSTOPK
    layers.abstopk_ = _legacy_abstopk if legacy else _FAST_ABSTOPK_
    layers.gelu_abstopk = _legacy_gelu_abstopk if legacy else _FAST_GELU_ABSTOPK
    sparsity_mod.project_topk_ = _legacy_project if legacy else _FAST_PROJECT
    if legacy:
        os.environ[SPARSE_BELOW] = "0"
    else:
        os.environ.pop(SPARSE_BELOW, None)


def model_config(width: int, n_layer: int = 2) -> GPTConfig:
    return GPTConfig(
        n_layer=n_layer, d_model=width, n_head=width // 16, d_head=16, block_size=256,
        vocab_size=2048,
    )  # fmt: skip


class Run:
    """One model at a fixed L0 (already projected) with its optimizer."""

    def __init__(
        self, width: int, frac: float, batch: int, *, fast: bool = False, tokens: float = -1.0
    ) -> None:
        torch.manual_seed(0)
        # the regrowth products' token share; -1: the trainer's default
        self.regrow_tokens = tokens if tokens > 0 else SPARSITY.regrow_tokens
        self.model = GPT(model_config(width))
        self.opt = build_optimizer(self.model, OptimConfig())
        # the trainer's fast mode: AdamW on the supports between regrowths (train/trainer.py)
        self.support_opt = SupportAdamW(self.opt) if fast else None
        self.sp = WeightSparsity(self.model, sparse_parameter_names(self.model))
        self.frac = frac
        self.sp.project_(frac)
        g = torch.Generator().manual_seed(0)
        self.xy = torch.randint(0, 2048, (batch, 257), generator=g)
        self.tokens = batch * 256

    def step(self, mode: str = "exact") -> None:
        x, y = self.xy[:, :-1], self.xy[:, 1:]
        kw = dict(lr=1e-3, frac=self.frac, optim=OptimConfig(), support_opt=self.support_opt)
        kw.update(regrow_precision=SPARSITY.regrow_precision, regrow_tokens=self.regrow_tokens)
        train_step(self.model, self.opt, self.sp, x, y, mode=mode, **kw)


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _fast(run: Run, every: int) -> float:
    """Average seconds per step of the fast mode: one regrowth step, then every - 1 support
    steps."""
    t = _timed(lambda: run.step("regrow"))
    return (t + sum(_timed(lambda: run.step("support")) for _ in range(every - 1))) / every


def training(
    width: int, rounds: int, batch: int, extra_every: list[int], extra_tokens: list[float]
) -> list[dict]:
    rows = []
    for label, frac in L0S.items():
        run = Run(width, frac, batch)
        variants: dict[str, Callable[[], float]] = {
            "masked-dense": lambda run=run: _timed(lambda: run.step("exact")),
            "ours exact": lambda run=run: _timed(lambda: run.step("exact")),
        }
        if frac < 1.0:
            fast_run = Run(width, frac, batch, fast=True)
            every = SPARSITY.regrow_every
            variants["ours fast"] = lambda run=fast_run, r=every: _fast(run, r)
            for r in extra_every:  # other regrowth intervals, on their own copies
                other = Run(width, frac, batch, fast=True)
                variants[f"fast R={r}"] = lambda run=other, r=r: _fast(run, r)
            for share in extra_tokens:  # regrowth products on part of the tokens
                other = Run(width, frac, batch, fast=True, tokens=share)
                variants[f"fast tok={share:g}"] = lambda run=other, r=every: _fast(run, r)
        for name, fn in variants.items():  # warm-up (crossover measurement, first touch)
            use_path(name)
            fn()
        times: dict[str, list[float]] = {n: [] for n in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                use_path(name)
                times[name].append(fn())
        med = {n: statistics.median(t) for n, t in times.items()}
        base = med["masked-dense"]
        for name, sec in med.items():
            rows.append(
                {
                    "width": width,
                    "l0": label,
                    "variant": name,
                    "ms_per_step": sec * 1e3,
                    "tokens_per_s": run.tokens / sec,
                    "vs_masked_dense": base / sec,
                }
            )
        use_path("ours exact")
    return rows


@torch.no_grad()
def inference(width: int, frac: float, rounds: int, batch: int) -> list[dict]:
    run = Run(width, frac, batch)
    model = run.model.eval()
    x = run.xy[:, :-1]
    times: dict[str, list[float]] = {"masked-dense": [], "ours": []}
    for name in times:  # warm-up
        use_path(name)
        model(x)
    for _ in range(rounds):
        for name in times:
            use_path(name)
            times[name].append(_timed(lambda: model(x)))
    use_path("ours")
    med = {n: statistics.median(t) for n, t in times.items()}
    return [
        {
            "width": width,
            "l0": f"1/{round(1 / frac)}",
            "variant": n,
            "tokens_per_s": run.tokens / s,
            "vs_masked_dense": med["masked-dense"] / s,
        }
        for n, s in med.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="256,1024")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="sequences of 256 tokens per step")
    ap.add_argument("--no-training", action="store_true")
    ap.add_argument("--inference", action="store_true", help="also time forward-only passes")
    ap.add_argument(
        "--regrow-every",
        type=int,
        action="append",
        default=[],
        help="also time the fast mode with this regrowth interval (repeatable; the default "
        f"is the trainer's, {SPARSITY.regrow_every})",
    )
    ap.add_argument(
        "--regrow-tokens",
        type=float,
        action="append",
        default=[],
        help="also time the fast mode with the regrowth products on this share of the tokens "
        f"(repeatable; the default is the trainer's, {SPARSITY.regrow_tokens:g})",
    )
    args = ap.parse_args()
    for share in args.regrow_tokens:
        if not 0.0 < share <= 1.0:
            ap.error(f"--regrow-tokens must be in (0, 1], got {share}")
    print(machine())
    widths = [int(w) for w in args.widths.split(",")]
    res: dict[str, list[dict]] = {"training": [], "inference": []}
    if not args.no_training:
        print(f"\nTraining step, 2 layers, {args.batch * 256} tokens/step")
        print(
            f"{'width':>6s} {'L0':>6s} {'variant':>13s} {'ms/step':>9s} {'tok/s':>8s} {'ratio':>7s}"
        )
        for w in widths:
            for r in training(w, args.rounds, args.batch, args.regrow_every, args.regrow_tokens):
                res["training"].append(r)
                print(
                    f"{r['width']:6d} {r['l0']:>6s} {r['variant']:>13s} {r['ms_per_step']:9.0f} "
                    f"{r['tokens_per_s']:8.0f} {r['vs_masked_dense']:6.2f}x"
                )
    if args.inference:
        print(f"\nInference (forward only), 2 layers, {args.batch * 256} tokens per call")
        for w in widths:
            for r in inference(w, 1 / 256, args.rounds, args.batch):
                res["inference"].append(r)
                print(
                    f"{r['width']:6d} {r['l0']:>6s} {r['variant']:>13s} "
                    f"{r['tokens_per_s']:9.0f} tok/s {r['vs_masked_dense']:6.2f}x"
                )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
