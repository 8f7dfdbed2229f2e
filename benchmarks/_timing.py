"""Shared helpers of the benchmark scripts: interleaved timing and the machine line."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so that machine noise hits
    every variant alike (PERF.md: run-to-run spread here is up to 2x)."""
    for fn in fns.values():  # warm-up: first-touch allocations, crossover measurement, caches
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from sparsecircuits.kernels import backend

    return (
        f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, kernels: {backend()}"
    )
