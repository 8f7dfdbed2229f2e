"""Where a sparse training step (or a forward pass) spends its time, by kernel family.

Wraps the kernels' autograd functions with wall-clock timers inside real steps of the
``sparse_training.py`` model (2 layers, 4,096 tokens, L0 1/64, the fast mode's support-only
steps unless ``--mode``), so the split is measured, not estimated; "other" is the rest of the
step (torch's elementwise ops, embeddings, residual adds, autograd). torch.profiler is not
used: on these VMs it inflates the ctypes-called kernels several-fold.

    python benchmarks/step_breakdown.py [--width 1024] [--mode support|regrow|exact|inference]
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable

from sparsecircuits._alloc import tune_allocator

tune_allocator()

import sparse_training as st  # noqa: E402
import torch  # noqa: E402
from _timing import machine  # noqa: E402

from sparsecircuits.kernels import (  # noqa: E402
    attention,
    linear,
    linear_topk,
    loss,
    norm,
    select,
)
from sparsecircuits.model import layers  # noqa: E402
from sparsecircuits.train import step as step_mod  # noqa: E402
from sparsecircuits.train import support_adamw  # noqa: E402

spent: collections.Counter[str] = collections.Counter()


def _timed(fn: Callable, name: str) -> Callable:
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0

    return wrapper


def instrument() -> None:
    """Timers on the kernels' entry points; none runs inside another, so the parts add up.
    (Module functions are wrapped where their callers look them up at call time.)"""
    functions = [
        (linear, "spmm", "CSR products (fwd, dx)"),
        (linear_topk, "spmm", "CSR products (fwd, dx)"),
        (linear_topk, "spmm_topk", "CSR product + AbsTopK (one pass)"),
        (linear, "sddmm", "support weight gradient"),
        (linear, "fused_support_backward", "CSR backward (AbsTopK bwd, dx, dW)"),
        (select, "abstopk_forward", "AbsTopK forward"),
        (linear_topk, "abstopk_forward", "AbsTopK forward"),  # after the products
        (select, "abstopk_", "AbsTopK forward"),  # in place, without gradients
        (layers, "abstopk_", "AbsTopK forward"),
        (support_adamw.SupportAdamW, "step", "support AdamW"),
        (step_mod, "estimated_sq", "gradient RMS"),
        (step_mod, "support_shares", "gradient RMS"),
        (step_mod, "grad_rms_scale", "gradient RMS"),
        (step_mod, "rescale_grads_", "gradient RMS"),
    ]
    for owner, attr, name in functions:
        setattr(owner, attr, _timed(getattr(owner, attr), name))
    methods = [
        (attention._NarrowAttention, "forward", "attention forward"),
        (attention._NarrowAttention, "backward", "attention backward"),
        (norm._RMSNorm, "forward", "RMSNorm forward"),
        (norm._RMSNorm, "backward", "RMSNorm backward"),
        (select._GeluAbsTopK, "backward", "AbsTopK(GELU) backward"),
        (select._AbsTopK, "backward", "AbsTopK backward"),
        (loss._CrossEntropy, "forward", "cross-entropy"),
        (loss._CrossEntropy, "backward", "cross-entropy"),
        (loss._AddLogitTables, "forward", "logit tables"),
    ]
    for cls, meth, name in methods:
        setattr(cls, meth, staticmethod(_timed(getattr(cls, meth), name)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument(
        "--mode", choices=["support", "regrow", "exact", "inference"], default="support"
    )
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    frac = 1 / 256 if args.mode == "inference" else 1 / 64
    run = st.Run(args.width, frac, 16, fast=True)
    st.use_path("ours")
    instrument()
    x = run.xy[:, :-1]
    if args.mode == "inference":
        model = run.model.eval()

        def one() -> None:
            with torch.no_grad():
                model(x)
    else:
        run.step("regrow")

        def one() -> None:
            run.step(args.mode)

    one()
    one()
    spent.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one()
    total = (time.perf_counter() - t0) / args.steps
    print(machine())
    what = "forward pass, L0 1/256" if args.mode == "inference" else f"{args.mode} step, L0 1/64"
    print(f"\nwidth {args.width}, {what}, 4096 tokens: {total * 1e3:.0f} ms")
    parts = sorted(spent.items(), key=lambda kv: -kv[1])
    for name, sec in parts:
        ms = sec / args.steps * 1e3
        print(f"  {name:28s} {ms:7.1f} ms  {100 * ms / (total * 1e3):5.1f}%")
    rest = total - sum(s for _, s in parts) / args.steps
    print(f"  {'other':28s} {rest * 1e3:7.1f} ms  {100 * rest / total:5.1f}%")


if __name__ == "__main__":
    main()
