"""Keep freed activation memory in the process heap during CPU training and inference.

glibc's allocator hands every block above its mmap threshold (128 KiB by default, adapting upwards
only slowly) back to the operating system as soon as it is freed, and trims the top of the heap.
A training step on the CPU frees and reallocates tens of megabytes of activations per layer, so
each batch page-faults the same memory back in: on the 2-core reference machine ``cpu-small``
spent 27 % of its CPU time in the kernel (431 M minor page faults in 29 minutes). Raising the
thresholds once at start-up keeps that memory mapped; a step of the recipe's network took about
a quarter less time (benchmarks/results/RESULTS.md). The cost is that the resident size stays at
its peak instead of shrinking between batches.

No-op where the C library is not glibc (macOS, Windows, musl) or when ``BONEAGE_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30   # blocks below 1 GiB come from the heap, not fresh mmaps
TRIM_THRESHOLD = (1 << 31) - 1  # never give the top of the heap back
TOP_PAD = 256 << 20        # grow the heap 256 MiB at a time

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Apply the thresholds once per process; True when they are in effect (forked workers inherit them)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("BONEAGE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in
                   ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return _applied
