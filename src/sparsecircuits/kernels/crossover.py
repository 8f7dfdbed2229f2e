"""Below which weight density the CSR kernels beat a dense matmul, per shape, measured once.

The crossover depends on the shape, the CPU and the thread count (PERF.md §1.1: ~1/2-1/4 for
the compiled kernels, ~1/8 for torch's CSR). The first layer of a new shape times dense vs
sparse forward + input-gradient products at densities 1/2 ... 1/32 on random data, and the
result is cached in ``<cache>/kernels/crossover.json`` keyed by CPU, threads, backend and the
compiled library's digest (a rebuilt library is measured again).

``SPARSECIRCUITS_SPARSE_BELOW`` overrides the measurement with one density for every shape:
``0`` never uses the sparse kernels, ``1.01`` always does (tests use both).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from sparsecircuits.errors import ConfigError
from sparsecircuits.fileio import atomic_write_json, cache_root
from sparsecircuits.kernels._lib import backend, build_id

log = logging.getLogger(__name__)

ENV = "SPARSECIRCUITS_SPARSE_BELOW"
DENSITIES = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32)
TOKENS = 2048  # tokens per timed product: a training micro-batch's order of magnitude
_memory: dict[str, float] = {}


def _override() -> float | None:
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{ENV}={raw!r}: expected a density such as 0.25") from None
    if value < 0:
        raise ConfigError(f"{ENV}={raw!r}: expected a density >= 0")
    return value


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(out_f: int, in_f: int) -> str:
    build = build_id()
    return f"{_cpu_name()}|threads={torch.get_num_threads()}|{backend()}|{build}|{out_f}x{in_f}"


def sparse_below(out_f: int, in_f: int) -> float:
    """Density below which a (out_f, in_f) weight runs on the CSR kernels (0: never)."""
    forced = _override()
    if forced is not None:
        return forced
    key = _key(out_f, in_f)
    if key not in _memory:
        path = cache_root() / "kernels" / "crossover.json"
        table = _read(path)
        if key not in table:
            table[key] = measure_crossover(out_f, in_f)
            log.info("sparse kernels: crossover for %dx%d is %.3f", out_f, in_f, table[key])
            try:
                atomic_write_json(path, {**_read(path), key: table[key]})
            except OSError as err:  # a read-only cache only costs a re-measurement next time
                log.warning("sparse kernels: cannot cache the crossover in %s (%s)", path, err)
        _memory[key] = float(table[key])
    return _memory[key]


def _read(path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}


def _timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_crossover(out_f: int, in_f: int, *, tokens: int = TOKENS, rounds: int = 3) -> float:
    """Time dense vs CSR (forward + input gradient) on random data; return the density below
    which CSR wins: the geometric mean of the first winning density and the one before it."""
    from sparsecircuits.kernels.csr import build_pattern
    from sparsecircuits.kernels.linear import spmm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_f, generator=g)
    dy = torch.randn(tokens, out_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)

    def dense() -> None:
        F.linear(x, w)
        dy.mm(w)

    t_dense = _timed(dense, rounds)
    losing = 1.0  # the last density at which dense won
    for d in DENSITIES:
        wd = w * (torch.rand(out_f, in_f, generator=g) < d)
        p = build_pattern(wd)
        val = wd.reshape(-1)[p.flat]
        valt = val[p.perm].contiguous()

        def sparse(p=p, val=val, valt=valt) -> None:
            spmm(p.crow, p.col, val, x, None, out_f)
            spmm(p.crow_t, p.col_t, valt, dy, None, in_f)

        if _timed(sparse, rounds) < t_dense:
            return (losing * d) ** 0.5
        losing = d
    return DENSITIES[-1] / 2  # never won in range: only clearly sparser weights
