"""Loading the compiled CPU kernels (``csrc/``), or saying why the torch fallback is used.

The library is a plain shared object built by the package install (``setup.py``, an optional
extension: an install without a compiler still succeeds) and called through ctypes with tensor
data pointers. ``SPARSECIRCUITS_KERNELS`` picks the backend: ``auto`` (default: compiled when
it loads), ``torch`` (force the pure-torch fallback) or ``cpp`` (fail loudly if it cannot load).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Literal

import torch

from sparsecircuits.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "SPARSECIRCUITS_KERNELS"
LIB_ENV = "SPARSECIRCUITS_KERNELS_LIB"
Backend = Literal["cpp", "torch"]
_MODULE = "sparsecircuits.kernels._sckernels"

_i64, _i32, _f32p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES: dict[str, list] = {
    # x, ld, y, ldy, mask, rows, n, k, threads
    "sc_abstopk": [_f32p, _i64, _f32p, _i64, _f32p, _i64, _i64, _i64, _i32],
    # w, mask, rows, cols, k, floor, threads
    "sc_project_topk": [_f32p, _f32p, _i64, _i64, _i64, _i64, _i32],
    # N, in, out, crow, col, val, x, bias, y, xsum, threads
    "sc_spmm": [_i64, _i64, _i64, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _i32],
    # N, in, out, crow, col, dy, x, dval, flat, threads
    "sc_sddmm": [_i64, _i64, _i64, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _i32],
    # N, in, out, crow, col, val, x, bias, nseg, seg widths, k, y, mask (int64 arrays), threads
    "sc_spmm_topk": [_i64, _i64, _i64, _f32p, _f32p, _f32p, _f32p, _f32p, _i64, _f32p, _f32p,
                     _f32p, _f32p, _i32],
    # N, in, out, crow (for nnz), crow_t, col_t, val_t, nseg, seg widths, g, ld, mask, h
    # (int64 arrays), x, dx, dbias, dval, flat, perm, threads
    "sc_linear_bwd": [_i64, _i64, _i64, _f32p, _f32p, _f32p, _f32p, _i64, _f32p, _f32p,
                      _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _i32],
    # src, idx, n, out, threads
    "sc_gather": [_f32p, _f32p, _i64, _f32p, _i32],
    # w, rows, cols, crow, threads -> nnz
    "sc_csr_count": [_f32p, _i64, _i64, _f32p, _i32],
    # w, rows, cols, crow, col, val, flat, threads
    "sc_csr_fill": [_f32p, _i64, _i64, _f32p, _f32p, _f32p, _f32p, _i32],
    # rows, cols, crow, col, crow_t, col_t, perm
    "sc_csr_transpose": [_i64, _i64, _f32p, _f32p, _f32p, _f32p, _f32p],
    # B, H, T, D, q, k, v, strides (12), sink, scale, y, lse, threads -> 0 or -1
    "sc_attn_fwd": [_i64, _i64, _i64, _i64, _f32p, _f32p, _f32p, _f32p, _f32p, ctypes.c_float,
                    _f32p, _f32p, _i32],
    # B, H, T, D, q, k, v, y, dy, strides (24), lse, sink, scale, dq, dk, dv, dsink, threads
    "sc_attn_bwd": [_i64, _i64, _i64, _i64, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p,
                    _f32p, ctypes.c_float, _f32p, _f32p, _f32p, _f32p, _i32],
    # gy, ld, mask, gx, rows, n, threads
    "sc_mask_grad": [_f32p, _i64, _f32p, _f32p, _i64, _i64, _i32],
    # x, gy, ld, mask, gx, rows, n, threads
    "sc_gelu_topk_grad": [_f32p, _f32p, _i64, _f32p, _f32p, _i64, _i64, _i32],
    # logits, targets, rows, n, lse, loss, grad (or null), scale, threads
    "sc_ce_fwd": [_f32p, _f32p, _i64, _i64, _f32p, _f32p, _f32p, ctypes.c_float, _i32],
    # logits, targets, lse, rows, n, scale, grad, threads
    "sc_ce_bwd": [_f32p, _f32p, _f32p, _i64, _i64, ctypes.c_float, _f32p, _i32],
    # logits, out, bias, table, idx, rows, n, threads
    "sc_add_logit_tables": [_f32p, _f32p, _f32p, _f32p, _f32p, _i64, _i64, _i32],
    # n, idx (or null), g, threads -> sum of squares (double)
    "sc_sumsq": [_i64, _f32p, _f32p, _i32],
    # n, idx, g, w, m, v, hyper-parameters (8 floats), compact moments, threads
    "sc_adamw_at": [_i64, _f32p, _f32p, _f32p, _f32p, _f32p, _f32p, _i32, _i32],
    # x, w, rows, n, eps, y, rstd, threads
    "sc_rmsnorm_fwd": [_f32p, _f32p, _i64, _i64, ctypes.c_float, _f32p, _f32p, _i32],
    # x, w, rstd, dy, ld, rows, n, dx, dw, threads
    "sc_rmsnorm_bwd": [_f32p, _f32p, _f32p, _f32p, _i64, _i64, _i64, _f32p, _f32p, _i32],
}  # fmt: skip
_RESTYPES = {
    "sc_csr_count": _i64,
    "sc_sumsq": ctypes.c_double,
    "sc_attn_fwd": _i32,
    "sc_attn_bwd": _i32,
}


def library_path() -> Path | None:
    """Where the install put the compiled library (or ``$SPARSECIRCUITS_KERNELS_LIB``, a
    library built by hand), or None when it was not built."""
    if os.environ.get(LIB_ENV):
        return Path(os.environ[LIB_ENV])
    spec = importlib.util.find_spec(_MODULE)
    return Path(spec.origin) if spec is not None and spec.origin else None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, reason) — reason says why the library is None."""
    path = library_path()
    if path is None:
        return None, "the compiled kernels were not built (no compiler at install time?)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"{path}: cannot load ({e})"
    if not hasattr(lib, "sc_isa"):
        return None, f"{path} is not a sparsecircuits kernel library (no sc_isa)"
    lib.sc_isa.restype = ctypes.c_char_p
    isa = lib.sc_isa().decode()
    if isa == "avx2" and not {"avx2", "fma"} <= cpu_flags():
        return None, f"{path} needs AVX2+FMA, which this CPU lacks"
    for name, args in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:  # a library built from older sources than this package
            return None, f"{path} has no {name}: rebuild it (reinstall the package)"
        fn.argtypes = args
        fn.restype = _RESTYPES.get(name)
    return lib, ""


# Below this many elementary operations a kernel call runs on one thread: waking a second one
# costs more than it saves (decoding one token: a 1024x256 product at 1/32 density took 14 us
# on one thread and 35-1000 us on two, measured while other processes shared the cores).
SMALL_WORK = 1 << 17


def threads_for(work: int) -> int:
    """Threads for a kernel call doing about ``work`` multiply-adds or element visits: 1 for
    small calls, else torch's thread count. Only for kernels whose threads split rows, so
    results do not depend on it (not for per-thread partial sums)."""
    return 1 if work < SMALL_WORK else torch.get_num_threads()


def requested_backend() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "cpp", "torch"):
        raise ConfigError(f"{ENV}={value!r}: expected one of auto, cpp, torch")
    return value


def lib() -> ctypes.CDLL | None:
    """The compiled library, or None when the torch fallback is in use."""
    want = requested_backend()
    if want == "torch":
        return None
    loaded, reason = _load()
    if loaded is None and want == "cpp":
        raise ConfigError(f"{ENV}=cpp but {reason}")
    if loaded is None:
        _warn_once(reason)
    return loaded


@functools.cache
def _warn_once(reason: str) -> None:
    log.info("sparse kernels: using the pure-torch fallback (%s)", reason)


def build_id() -> str:
    """Which kernels are in use: ``"torch"``, or a digest of the compiled library (so that
    measurements cached per build, like the density crossover, expire with a rebuild)."""
    return "torch" if lib() is None else _load_digest()


@functools.cache
def _load_digest() -> str:
    """Digest of the library file ``_load`` opened (once per process, like the load)."""
    path = library_path()
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()[:12] if path else "unknown"
    except OSError:
        return "unreadable"


def backend() -> Backend:
    """``"cpp"`` when the compiled kernels are in use, else ``"torch"``."""
    return "cpp" if lib() is not None else "torch"
