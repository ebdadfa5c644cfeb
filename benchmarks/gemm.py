"""GEMM time per kernel at the shapes of the training workloads: fp32, bf16, int8.

What an emulated recipe can gain depends on how much faster this CPU's bf16 and int8 GEMMs are
than its fp32 GEMM: `bf16-mixed` and the fp8/MX/NVFP4 recipes run bf16 GEMMs, `int8` runs
`torch._int_mm` in its forward. Shapes are (tokens M, in-features K, out-features N) of the linear
layers of the `tiny` and `small` models at batch 16 x 256. oneDNN's quantized linear is shown with
the weight packed once (inference) and packed on every call (training, where the weight changes).

    .venv/bin/python benchmarks/gemm.py [--write]
"""

from __future__ import annotations

import statistics
import time

import torch
from benchmarks_md import (
    DefaultsFormatter,
    ScriptParser,
    at_least,
    command_line,
    cpu_description,
    publish,
    run_script,
)

SHAPES = [
    (4096, 128, 128),
    (4096, 128, 344),
    (4096, 344, 128),
    (4096, 384, 1024),
    (4096, 1024, 384),
]


def timed(fn, rounds: int, budget_s: float) -> float:
    """Median milliseconds of ``rounds`` calls after a warm-up call, fewer (at least one) where
    they would take more than ``budget_s``: oneDNN's int8 linear falls back to a reference
    implementation on some CPUs (0.7-17 s a call on an AMD EPYC, `lowbit.infer.onednn`)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    samples = []
    for _ in range(max(1, min(rounds, int(budget_s / max(first, 1e-9))))):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def kernels(m: int, k: int, n: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    a32, b32 = a.float(), b.float()
    a16, b16 = a.bfloat16(), b.bfloat16()
    cases = {
        "fp32": lambda: a32 @ b32.t(),
        "bf16": lambda: a16 @ b16.t(),
        "int8 (torch._int_mm)": lambda: torch._int_mm(a, b.t()),
    }
    try:
        packed = torch.ops.onednn.qlinear_prepack(b, None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return cases
    scales, zero_points = torch.ones(n), torch.zeros(n, dtype=torch.int64)

    def qlinear(weight):
        return torch.ops.onednn.qlinear_pointwise(
            a, 1.0, 0, weight, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        )

    cases["int8 (oneDNN, packed once)"] = lambda: qlinear(packed)
    cases["int8 (oneDNN, packed per call)"] = lambda: qlinear(
        torch.ops.onednn.qlinear_prepack(b, None)
    )
    return cases


def main() -> int:
    parser = ScriptParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--budget", type=float, default=2.0, help="seconds per kernel and shape at most (about)"
    )
    parser.add_argument(
        "--kernels",
        default="",
        help="comma-separated kernel names to time, matched by their start (fp32,bf16: oneDNN's "
        "int8 reference fallback takes minutes on some CPUs); default: all",
    )
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    at_least(parser, args, 1, "rounds")  # --rounds 0 timed forever
    if args.budget <= 0:
        parser.error(f"--budget must be above 0, got {args.budget}")
    wanted = [name.strip() for name in args.kernels.split(",") if name.strip()]
    rows = []
    names: list[str] = []
    for shape in SHAPES:
        chosen = {
            name: fn
            for name, fn in kernels(*shape).items()
            if not wanted or any(name.startswith(w) for w in wanted)
        }
        if not chosen:
            raise SystemExit(
                f"gemm.py: --kernels {args.kernels!r} names no kernel; fix: e.g. fp32,bf16"
            )
        times = {name: timed(fn, args.rounds, args.budget) for name, fn in chosen.items()}
        names = names or list(times)
        rows.append((shape, times))
    header = "| M x K -> N | " + " | ".join(f"{name} (ms)" for name in names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    for (m, k, n), times in rows:
        cells = " | ".join(f"{times[name]:.2f}" for name in names)
        lines.append(f"| {m} x {k} -> {n} | {cells} |")
    text = (
        f"Median of {args.rounds} calls (fewer where they would take over {args.budget:g} s), "
        f"{torch.get_num_threads()} threads, "
        f"{cpu_description()}.\nCommand: `{command_line()}`\n\n" + "\n".join(lines)
    )
    publish("## GEMM time per kernel (benchmarks/gemm.py)", text, args.write)
    return 0


if __name__ == "__main__":
    run_script(main)
