"""Keep glibc from returning large freed blocks to the OS (PERF.md §0.3).

Under the VMs we run on, every fresh large allocation pays page faults (~0.5 ms/MB); activations
are freed and re-allocated every step, so this costs up to 1.6x in sparse training. Must run
before torch allocates anything; a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Apply the mallopt settings; returns True when they took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok_mmap = libc.mallopt(_M_MMAP_MAX, 0)
        ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        return False
    return bool(ok_mmap and ok_trim)
