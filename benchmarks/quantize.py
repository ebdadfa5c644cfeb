"""Throughput of `cast` and `quantize` per format and granularity, next to copy bandwidth.

    .venv/bin/python benchmarks/quantize.py            # full table (eager and torch.compile)
    .venv/bin/python benchmarks/quantize.py --quick    # a few configurations, fewer repeats
    .venv/bin/python benchmarks/quantize.py --write    # also update BENCHMARKS.md

Every call reads one fp32 tensor of ``--mib`` MiB (64 by default); GB/s counts those input bytes
only (outputs, scales and temporaries are not counted). The reference is the machine's copy
bandwidth measured in the same run: ``out.copy_(x)`` into a preallocated buffer (a fresh 64 MiB
allocation costs ~20 ms of page faults and would hide the kernels' own speed). Each configuration
is timed in rounds of [copy, fused, eager, compiled] side by side, and the table reports medians and
the ratio to the copy medians of the same rounds: these machines are noisy, so read the ratios.

Three ways to run the same call: ``fused`` is what lowbit does on CPU (`lowbit.kernels`, one pass
per block; configurations it does not serve fall back to PyTorch ops), ``eager`` the PyTorch-ops
path (what runs on CUDA, and on CPU with ``LOWBIT_KERNELS=0``), ``compiled`` that path under
`torch.compile`. All three must give the same bits; the note says when they do not.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

# What `import lowbit` (and so the `lowbit` command) sets before torch allocates: transparent huge
# pages for large CPU tensors (see lowbit/__init__.py); torch is imported first here.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks_md import (  # noqa: E402
    DefaultsFormatter,
    ScriptParser,
    at_least,
    cpu_description,
    run_script,
    write_section,
)

from lowbit import kernels  # noqa: E402
from lowbit.formats import cast, quantize  # noqa: E402

HEADING = "## Quantization throughput (benchmarks/quantize.py)"

# (op, format, granularity, block_size); op "cast" ignores granularity
CONFIGS = [
    ("cast", "fp8_e4m3", None, None),
    ("cast", "fp8_e5m2", None, None),
    ("cast", "fp6_e3m2", None, None),
    ("cast", "fp6_e2m3", None, None),
    ("cast", "fp4_e2m1", None, None),
    ("cast", "bf16", None, None),
    ("cast", "fp16", None, None),
    ("cast", "int8", None, None),
    ("quantize", "fp8_e4m3", "tensor", None),
    ("quantize", "fp8_e4m3", "axis", None),
    ("quantize", "fp8_e4m3", "block", 128),
    ("quantize", "fp8_e4m3", "block2d", (128, 128)),
    ("quantize", "fp8_e4m3", "mx", None),
    ("quantize", "fp8_e5m2", "tensor", None),
    ("quantize", "fp8_e5m2", "mx", None),
    ("quantize", "fp6_e3m2", "mx", None),
    ("quantize", "fp6_e2m3", "mx", None),
    ("quantize", "fp4_e2m1", "mx", None),
    ("quantize", "fp4_e2m1", "nvfp4", None),
    ("quantize", "fp4_e2m1", "nvfp4", (16, 16)),
    ("quantize", "int8", "axis", None),
    ("quantize", "int4", "block", 32),
    ("quantize", "bf16", "tensor", None),
]
QUICK = {
    ("cast", "fp8_e4m3", None, None),
    ("quantize", "fp8_e4m3", "tensor", None),
    ("quantize", "fp8_e4m3", "mx", None),
    ("quantize", "fp4_e2m1", "mx", None),
}


def make_fn(op, fmt, granularity, block, fused: bool = True):
    def run(x):
        if op == "cast":
            return cast(x, fmt)
        q = quantize(x, fmt, granularity, block_size=block)
        return q.values, q.scale

    if fused:
        return run

    def pytorch_ops(x):
        with kernels.disabled():
            return run(x)

    return pytorch_ops


def _outputs(result) -> tuple[torch.Tensor, ...]:
    """Result tensors viewed as integers, so that NaNs and signed zeros compare bit for bit."""
    tensors = result if isinstance(result, tuple) else (result,)
    return tuple(
        t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])
        for t in tensors
    )


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def label(op, fmt, granularity, block) -> tuple[str, str]:
    if op == "cast":
        return f"cast {fmt}", "-"
    size = "" if block is None else "x".join(map(str, block)) if isinstance(block, tuple) else block
    return f"quantize {fmt}", f"{granularity}{size and ' ' + str(size)}"


def measure(configs, x, out, repeats: int, compile_: bool):
    nbytes = x.numel() * x.element_size()

    def copy(_):
        out.copy_(x)

    rows = []
    compiled_cache: dict[tuple, object] = {}
    for config in configs:
        fused = make_fn(*config)
        eager = make_fn(*config, fused=False)
        compiled, note = None, ""
        if compile_:
            try:
                # One configuration at a time: a fresh dynamo cache, so that recompilations for
                # earlier formats do not reach the recompile limit (past it dynamo runs eager).
                torch._dynamo.reset()
                compiled = compiled_cache.setdefault(config, torch.compile(eager))
                start = time.perf_counter()
                compiled(x)  # warm-up: tracing and code generation
                note = f"warm-up {time.perf_counter() - start:.0f} s"
            except Exception as error:  # report, do not crash: compile support varies
                compiled, note = None, f"compile failed: {type(error).__name__}"
        eager(x)
        fused(x)
        copies, fuseds, eagers, compileds = [], [], [], []
        for _ in range(repeats):
            copies.append(timed(copy, x))
            fuseds.append(timed(fused, x))
            eagers.append(timed(eager, x))
            if compiled is not None:
                compileds.append(timed(compiled, x))
        t_copy = statistics.median(copies)
        t_fused = statistics.median(fuseds)
        t_eager = statistics.median(eagers)
        t_comp = statistics.median(compileds) if compileds else None
        reference = _outputs(eager(x))
        same = _same(_outputs(fused(x)), reference)
        note = (note + ", " if note else "") + (
            "fused = eager bits" if same else "fused DIFFERS from eager"
        )
        if compiled is not None:
            same = _same(_outputs(compiled(x)), reference)
            note += ", compiled = eager bits" if same else ", compiled DIFFERS from eager"
        rows.append((config, nbytes / t_copy / 1e9, t_copy, t_fused, t_eager, t_comp, note))
        print(f"  {' '.join(label(*config)):<32} done", file=sys.stderr, flush=True)
    return rows


def table(rows, nbytes: int, repeats: int, command: str) -> str:
    copy_gbs = statistics.median(r[1] for r in rows)
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {cpu_description()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}"
        " (transparent huge pages for fresh outputs, as `import lowbit` sets).  ",
        f"Input: one fp32 tensor of {nbytes / 2**20:.0f} MiB; GB/s = input bytes read per call "
        f"/ median time of {repeats} calls. Copy bandwidth (`out.copy_(x)`, preallocated, same "
        f"rounds): median {copy_gbs:.2f} GB/s. '% copy' = copy time / call time, per row, from "
        "the same rounds. Columns: `fused` is what `quantize` runs on CPU (lowbit's kernel, "
        "`lowbit.kernels`; `cast` and configurations it does not serve fall back to PyTorch ops), "
        "`eager` the PyTorch-ops path (CUDA's, or `LOWBIT_KERNELS=0`), `compiled` that path under "
        "`torch.compile`.",
        "",
        "| op | granularity | fused GB/s | fused % copy | eager GB/s | eager % copy "
        "| compiled GB/s | compiled % copy | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cells(t_copy, t) -> str:
        return f"{nbytes / t / 1e9:.2f} | {100 * t_copy / t:.0f}%" if t else "- | -"

    for config, _copy_gbs, t_copy, t_fused, t_eager, t_comp, note in rows:
        op, gran = label(*config)
        lines.append(
            f"| {op} | {gran} | {cells(t_copy, t_fused)} | {cells(t_copy, t_eager)} "
            f"| {cells(t_copy, t_comp)} | {note} |"
        )
    if any("compiled DIFFERS" in row[-1] for row in rows):
        lines += [
            "",
            "DIFFERS: the compiled function's output is not bit-identical to eager. For `cast` to "
            "bf16/fp16 of an fp32 tensor, Inductor drops the fp32 -> bf16 -> fp32 round trip and "
            "returns the input unrounded, unless `torch._inductor.config.emulate_precision_casts "
            "= True`: do not trust a compiled `cast` to a 16-bit format without that flag.",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--quick", action="store_true", help="4 configurations, 3 repeats")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md's section")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per row (default 7; 3 with --quick)"
    )
    parser.add_argument("--mib", type=int, default=64, help="input size in MiB")
    args = parser.parse_args(argv)
    # --mib 0 timed empty tensors at 0.00 GB/s; --repeats 0 was taken for the default
    at_least(parser, args, 1, "mib", "repeats")
    repeats = args.repeats or (3 if args.quick else 7)
    configs = [c for c in CONFIGS if not args.quick or c in QUICK]
    numel = args.mib * 2**20 // 4
    x = torch.randn(numel // 4096, 4096, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(x)
    rows = measure(configs, x, out, repeats, compile_=not args.no_compile)
    command = "python benchmarks/quantize.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = table(rows, x.numel() * 4, repeats, command.strip())
    print(text)
    if args.write:
        write_section(HEADING, text)
    return 0


if __name__ == "__main__":
    run_script(main)
