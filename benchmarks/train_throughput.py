"""Training throughput of the `small` preset: dense vs weight L0 1/16 and 1/64, same process.

Times the real training step (forward, backward, gradient-RMS control, AdamW, top-k projection)
on random tokens, round-robin over the variants so machine noise hits all alike, and reports the
median tokens/s, the ratio to dense, and each variant's peak RSS (measured in a fresh process).

    python benchmarks/train_throughput.py [--rounds 5] [--steps 3] [--preset small]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from sparsecircuits._alloc import tune_allocator

tune_allocator()

import torch  # noqa: E402

from sparsecircuits.model import GPT, WeightSparsity, sparse_parameter_names  # noqa: E402
from sparsecircuits.train.config import preset_config  # noqa: E402
from sparsecircuits.train.optim import build_optimizer  # noqa: E402
from sparsecircuits.train.trainer import train_step  # noqa: E402

VARIANTS = {"dense": 1.0, "L0 1/16": 1 / 16, "L0 1/64": 1 / 64}


class Variant:
    """A model at a fixed L0 fraction (already projected), ready to step."""

    def __init__(self, preset: str, frac: float) -> None:
        self.cfg = preset_config(preset, sparsity={"target_l0": frac})
        torch.manual_seed(0)
        self.model = GPT(self.cfg.model)
        self.opt = build_optimizer(self.model, self.cfg.optim)
        self.sparsity = WeightSparsity(self.model, sparse_parameter_names(self.model))
        self.frac = frac
        self.sparsity.project_(frac)
        T, V = self.cfg.model.block_size, self.cfg.model.vocab_size
        g = torch.Generator().manual_seed(0)
        self.xy = torch.randint(0, V, (self.cfg.batch_size, T + 1), generator=g)

    def step(self) -> None:
        x, y = self.xy[:, :-1], self.xy[:, 1:]
        train_step(
            self.model, self.opt, self.sparsity, x, y, lr=1e-3, frac=self.frac, optim=self.cfg.optim
        )

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.tokens_per_step


def peak_rss_mb(preset: str, frac: float, steps: int) -> float:
    """Peak RSS (MB) of a fresh process that builds the variant and runs ``steps`` steps."""
    cmd = [
        sys.executable,
        __file__,
        "--preset",
        preset,
        "--rss-of",
        str(frac),
        "--steps",
        str(steps),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _own_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rss-of", type=float, help=argparse.SUPPRESS)  # child-process mode
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_of is not None:
        v = Variant(args.preset, args.rss_of)
        for _ in range(args.steps):
            v.step()
        print(_own_peak_rss_mb())
        return

    variants = {name: Variant(args.preset, frac) for name, frac in VARIANTS.items()}
    for v in variants.values():  # warm-up: first-touch allocations, lazy init
        v.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                v.step()
            times[name].append((time.perf_counter() - t0) / args.steps)

    cfg = next(iter(variants.values())).cfg
    m = cfg.model
    print(
        f"preset {args.preset}: {m.n_layer} layers, d_model {m.d_model}, ctx {m.block_size}, "
        f"batch {cfg.batch_size} ({cfg.tokens_per_step} tokens/step), "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    print(
        f"{'variant':10s} {'ms/step':>9s} {'tokens/s':>10s} {'vs dense':>9s} {'peak RSS MB':>12s}"
    )
    dense = statistics.median(times["dense"])
    results = {}
    for name, v in variants.items():
        sec = statistics.median(times[name])
        rss = peak_rss_mb(args.preset, VARIANTS[name], steps=2)
        results[name] = {
            "ms_per_step": sec * 1e3,
            "tokens_per_s": v.tokens_per_step / sec,
            "speedup_vs_dense": dense / sec,
            "peak_rss_mb": rss,
        }
        print(
            f"{name:10s} {sec * 1e3:9.0f} {v.tokens_per_step / sec:10.0f} {dense / sec:8.2f}x "
            f"{rss:12.0f}"
        )
    print(
        f"this process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
