"""Keep freed CPU memory in the process for reuse, so training steps stop page-faulting.

glibc's malloc serves large requests (above a threshold that starts at 128 KB and adapts to what
was freed, up to 32 MB) with fresh `mmap`s and hands them back with `munmap` when freed, and it
returns the top of the heap to the system once more than 128 KB there is free. A training step
allocates and frees the same activation-sized buffers every step, so each step pays the page
faults of touching fresh memory again, and how much depends on the adaptive threshold's history
(and on PyTorch's huge-page alignment, `THP_MEM_ALLOC_ENABLE`): fp32 steps of the default
workload took 195 ms in one process and 295 ms in another (`benchmarks/recipe_speed.py`; the
measurements are in docs/formats.md and BENCHMARKS.md). Fixing the mmap threshold at its ceiling
(32 MB) and raising the trim threshold to 1 GiB lets freed blocks be reused without faults, as
the caching allocators of PyTorch's GPU backends and jemalloc/tcmalloc setups do; the cost is
that the process keeps up to that much freed memory instead of returning it.

`import lowbit` applies this (glibc only) unless ``LOWBIT_MALLOC=0`` or glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables are set, which win.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Set glibc's thresholds as described above; True when they were set."""
    if os.environ.get("LOWBIT_MALLOC") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def _glibc():
    """The process's C library when it is glibc (it has mallopt and gnu_get_libc_version)."""
    try:
        libc = ctypes.CDLL(None)  # the symbols the process has loaded, the C library's among them
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc
