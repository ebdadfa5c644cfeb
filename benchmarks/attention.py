"""Forward and backward time of CPU scaled-dot-product attention per dtype and kernel.

Why `lowbit.nn.attention` exists: PyTorch's CPU flash-attention backward is slower on bf16 inputs
than on fp32 ones at small head sizes, so bf16 recipes run the backward in fp32; on a CPU without
AVX512-FP16 both fp16 kernels are slow, so fp16 recipes run both in fp32. This
measures the kernels side by side at the default workload's attention shape (tiny Llama: batch
16, 4 heads, 256 tokens, head size 32, causal), median of round-robin repetitions.

    .venv/bin/python benchmarks/attention.py [--batch 16 --heads 4 --seq 256 --head-dim 32] [--write]
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from benchmarks_md import (
    DefaultsFormatter,
    ScriptParser,
    at_least,
    command_line,
    cpu_description,
    publish,
    run_script,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowbit.nn.attention import AttentionInFp32

CASES = {
    "fp32, flash kernel": (torch.float32, SDPBackend.FLASH_ATTENTION, False),
    "bf16, flash kernel": (torch.bfloat16, SDPBackend.FLASH_ATTENTION, False),
    "bf16, math kernel": (torch.bfloat16, SDPBackend.MATH, False),
    "bf16 via lowbit (bf16 forward, fp32 backward)": (
        torch.bfloat16,
        SDPBackend.FLASH_ATTENTION,
        True,
    ),
    "fp16, flash kernel": (torch.float16, SDPBackend.FLASH_ATTENTION, False),
    "fp16 via lowbit (fp32 forward and backward)": (
        torch.float16,
        SDPBackend.FLASH_ATTENTION,
        True,
    ),
}


def one_call(shape, dtype, backend, rerouted) -> tuple[float, float]:
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)
    mode = AttentionInFp32() if rerouted else contextlib.nullcontext()
    start = time.perf_counter()
    with sdpa_kernel(backend), mode:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    middle = time.perf_counter()
    out.backward(grad)
    return middle - start, time.perf_counter() - middle


def main() -> int:
    parser = ScriptParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    # --rounds 0 was a StatisticsError traceback (no median)
    at_least(parser, args, 1, "batch", "heads", "seq", "head_dim", "rounds")
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    times = {name: [] for name in CASES}
    for round_ in range(args.rounds + 2):
        for name, case in CASES.items():
            measured = one_call(shape, *case)
            if round_ >= 2:  # two warm-up rounds
                times[name].append(measured)
    lines = [
        "| attention | forward (ms) | backward (ms) | total (ms) |",
        "|---|---:|---:|---:|",
    ]
    for name, samples in times.items():
        forward = statistics.median(s[0] for s in samples)
        backward = statistics.median(s[1] for s in samples)
        lines.append(
            f"| {name} | {forward * 1e3:.1f} | {backward * 1e3:.1f} | "
            f"{(forward + backward) * 1e3:.1f} |"
        )
    text = (
        f"Causal attention, shape (batch, heads, tokens, head size) = {shape}, median of "
        f"{args.rounds} round-robin calls, {torch.get_num_threads()} threads, "
        f"{cpu_description()}.\n"
        f"Command: `{command_line()}`\n\n" + "\n".join(lines)
    )
    publish("## CPU attention per dtype (benchmarks/attention.py)", text, args.write)
    return 0


if __name__ == "__main__":
    run_script(main)
