"""glibc's allocator thresholds, set once at import so that the large temporaries of batched CPU work are reused.

torch takes host memory from ``malloc``; glibc serves every block above ``M_MMAP_THRESHOLD`` (128 KiB, raised
only as blocks are freed) with a fresh ``mmap`` and returns it on ``free``, so each new multi-megabyte
temporary of a batched operation (slice coordinates, interpolation weights, scatter contributions) starts
on pages the kernel must fault in and zero again. Serving blocks up to 32 MiB from the heap, growing the heap
by 256 MiB at a time and keeping up to 1 GiB of freed heap before trimming removes that: the Gaussian-kernel
insertion of 6,400 slices of 64 px took 1.6 s instead of 2.7 s, and sparse-tv on set_3j9g
(``benchmarks/refine.py --set-3j9g``, 2 cores) 180 s instead of 219 s with only the mmap threshold and a
256 MiB trim threshold. The cost is resident memory: freed blocks stay with the process (up to the trim
threshold) instead of going back to the system at once. This is what PyTorch's CPU performance notes get by
swapping in jemalloc or tcmalloc, done with glibc's own ``mallopt``; other C libraries (macOS, musl) are left
alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
#: Blocks up to this size come from the heap (glibc's ceiling for the threshold on 64-bit systems).
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: Freed heap kept before it is returned to the system.
TRIM_THRESHOLD_BYTES = 1024 * 2**20
#: Extra heap requested from the system whenever the heap grows.
TOP_PAD_BYTES = 256 * 2**20


def tune_host_allocator() -> bool:
    """Set the thresholds above on glibc; returns whether they were set (False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                (M_TOP_PAD, TOP_PAD_BYTES))
    return all(bool(mallopt(param, value)) for param, value in settings)
