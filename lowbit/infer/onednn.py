"""Whether oneDNN's int8 linear is a fast kernel on this CPU, measured once per process.

oneDNN's quantized linear (``torch.ops.onednn.qlinear_pointwise``) is PyTorch's own x86 int8
inference kernel, and on the Intel Xeon with AMX of earlier sessions it was the faster int8 GEMM
for batched evaluation. On other x86 CPUs it can fall back to a reference implementation: on an
AMD EPYC (AVX512-VNNI, no AMX) one call at 4096 x 128 -> 128 took 0.72 s, against 0.21 ms for
``torch._int_mm`` (`benchmarks/gemm.py`, 2 threads, BENCHMARKS.md). Nothing PyTorch exposes says which
implementation oneDNN picked, so `onednn_int8_is_fast` times both kernels once on a small GEMM.
The choice must not flip between runs of one machine (the two kernels apply the fp32 scales in a
different order, so their outputs can differ in the last bit): oneDNN is kept unless it is more
than `SLOWER` times slower, a margin no timing noise crosses when the kernels are alike (near 1x)
and that a reference fallback (thousands of times slower) always does.
"""

from __future__ import annotations

import functools
import time

import torch

SLOWER = 4.0
_PROBE = (64, 64, 64)  # M, K, N: ~10 ms for a reference implementation, microseconds otherwise


def _best_of(fn, calls: int = 3) -> float:
    fn()  # the first call creates oneDNN's primitive
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def onednn_int8_is_fast() -> bool:
    """oneDNN's quantized linear exists in this build and is at most `SLOWER` times slower than
    ``torch._int_mm`` at a small int8 GEMM on this CPU (measured once per process)."""
    m, k, n = _PROBE
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    try:
        packed = torch.ops.onednn.qlinear_prepack(b, None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    scales, zero_points = torch.ones(n), torch.zeros(n, dtype=torch.int64)

    def onednn():
        return torch.ops.onednn.qlinear_pointwise(
            a, 1.0, 0, packed, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        )

    return _best_of(onednn) <= SLOWER * _best_of(lambda: torch._int_mm(a, b.t()))
