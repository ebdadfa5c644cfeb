"""How fast int8 could train against bf16-mixed on this CPU if its forward int8 GEMMs, and then
also their epilogue, cost nothing: a bound on what any faster int8 GEMM kernel can give.

Why: issue 3 asks `int8` to train faster than `bf16-mixed`. int8's forward GEMMs run
`torch._int_mm` (oneDNN's s8s8s32 GEMM), then an epilogue that scales the int32 sums into bf16
(`lowbit::scale_rows_cols`); its gradient GEMMs run in bf16, as bf16-mixed's do. A better kernel
(a hand-written AMX-INT8 one, say) can at most make the first free, and one with the epilogue
fused can at most leave the output's write. This script measures those two cases directly: the
CPU kernel of `aten::_int_mm` (which both `torch._int_mm` and lowbit's C++ layer call) is
overridden through `torch.library` by one returning a cached int32 zero accumulator (no GEMM, no
memset), and in the last row lowbit's epilogue too, by one returning a fresh zero output. If int8
is not faster than bf16-mixed with these free, no int8 GEMM kernel makes it so.

The zeros change the numbers the int8 model computes, not the shapes or the work of the ops
around the GEMMs; its parameters stay finite (checked, and printed). The three int8 rows step one
model. Per round, one step of each row in turn, in one process (the machine's noise hits all
alike); reported per row: the forward (autocast, model, loss) and whole-step wall times (median
and minimum over the rounds), the step's CPU time (the process's, median), and against
bf16-mixed the median of the rounds' ratios of each. On a machine that other work keeps busy, a
wall time counts the time the process waited for a core; its CPU time does not, so with one
thread (PyTorch's ops and autograd then run on the calling thread) the CPU-time ratio is the
steadier one. With more threads CPU time also counts OpenMP's threads spinning while they wait.
The workload is `lowbit train`'s default, as in benchmarks/recipe_speed.py. CPU only.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8_bound.py [--rounds 10] [--threads 1]
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import statistics
import time
import warnings

# What `import lowbit` sets before torch allocates (see recipe_speed.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.nn.functional as F
from benchmarks_md import (
    DefaultsFormatter,
    ScriptParser,
    at_least,
    command_line,
    cpu_description,
    run_script,
)
from recipe_speed import Run

from lowbit.data import build_tokenizer, load_corpus, tokenize_split
from lowbit.errors import UsageError

BF16, INT8 = "bf16-mixed", "int8"
FREE_GEMMS, FREE_BOTH = "int8, free int8 GEMMs", "int8, free GEMMs and epilogue"
ROWS = (BF16, INT8, FREE_GEMMS, FREE_BOTH)


class FreeKernels:
    """Overrides of int8's forward GEMM and epilogue that cost (almost) nothing, counting calls."""

    def __init__(self):
        self.calls = collections.Counter()
        self.zero_sums: dict[tuple[int, int], torch.Tensor] = {}

    def int_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """No GEMM: one int32 zero accumulator per output shape, made once (finite values
        downstream, no memset per call)."""
        self.calls["_int_mm"] += 1
        shape = (a.shape[0], b.shape[1])
        if shape not in self.zero_sums:
            self.zero_sums[shape] = torch.zeros(shape, dtype=torch.int32)
        return self.zero_sums[shape]

    def epilogue(self, acc, row, col, out_dtype=None) -> torch.Tensor:
        """A fresh zero output: only the write of the output that a fused epilogue makes."""
        self.calls["scale_rows_cols"] += 1
        return torch.zeros(acc.shape, dtype=out_dtype or torch.float32)

    @contextlib.contextmanager
    def active(self, epilogue: bool):
        """The overrides registered for the CPU while inside, the real kernels back after."""
        libraries = [torch.library.Library("aten", "IMPL")]
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": meant
            warnings.simplefilter("ignore", UserWarning)
            libraries[0].impl("_int_mm", self.int_mm, "CPU")
            if epilogue:
                libraries.append(torch.library.Library("lowbit", "IMPL"))
                libraries[1].impl("scale_rows_cols", self.epilogue, "CPU")
        try:
            yield
        finally:
            for library in libraries:
                library._destroy()


def timed_step(run: Run) -> tuple[float, float, float]:
    """One training step of ``run`` (recipe_speed's), timed: (forward wall, step wall, step CPU
    time of the process) in seconds."""
    x, y = next(run.batches)
    start, start_cpu = time.perf_counter(), time.process_time()
    with run.precision.autocast():
        logits = run.model(x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    forward = time.perf_counter() - start
    run.precision.backward(loss)
    run.precision.clip_grad_norm_(run.optimizer, 1.0)
    run.precision.step(run.optimizer)
    run.optimizer.zero_grad(set_to_none=True)
    return forward, time.perf_counter() - start, time.process_time() - start_cpu


def measure(args, free: FreeKernels) -> tuple[dict[str, list[tuple[float, float, float]]], dict]:
    """Per row, the (forward, step, step CPU) times of its ``args.rounds`` steps, one of each per
    round; per model, whether its parameters are finite after them."""
    tokens = tokenize_split(build_tokenizer("byte"), load_corpus().texts("train"))
    runs = {
        name: Run(name, tokens, args.batch, args.seq, args.size, "cpu") for name in (BF16, INT8)
    }
    for run in runs.values():
        for _ in range(args.warmup):
            timed_step(run)
    gc.collect()
    gc.freeze()  # as recipe_speed.py: no full collector passes over the models mid-measurement
    times = {name: [] for name in ROWS}
    for _ in range(args.rounds):
        times[BF16].append(timed_step(runs[BF16]))
        times[INT8].append(timed_step(runs[INT8]))
        with free.active(epilogue=False):
            times[FREE_GEMMS].append(timed_step(runs[INT8]))
        with free.active(epilogue=True):
            times[FREE_BOTH].append(timed_step(runs[INT8]))
    finite = {
        name: all(p.isfinite().all().item() for p in run.model.parameters())
        for name, run in runs.items()
    }
    return times, finite


def table(times: dict[str, list[tuple[float, float, float]]]) -> str:
    """Per row: forward and step wall-time medians and minima and the step CPU time's median (ms),
    and against bf16-mixed the median of the per-round ratios of step, forward and CPU time."""
    lines = [
        "| row | forward ms, median (min) | step ms, median (min) | step CPU ms | "
        "step / bf16-mixed | forward / bf16-mixed | step CPU / bf16-mixed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = times[BF16]
    for name in ROWS:
        forward, step, cpu = ([t[i] for t in times[name]] for i in range(3))
        ratios = [
            statistics.median(t[i] / b[i] for t, b in zip(times[name], base)) for i in (1, 0, 2)
        ]
        lines.append(
            f"| {name} | {statistics.median(forward) * 1e3:,.1f} ({min(forward) * 1e3:,.1f}) "
            f"| {statistics.median(step) * 1e3:,.1f} ({min(step) * 1e3:,.1f}) "
            f"| {statistics.median(cpu) * 1e3:,.1f} | "
            + " | ".join(f"{ratio:.3f}" for ratio in ratios)
            + " |"
        )
    return "\n".join(lines)


def load() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was (the ratios' noise)."""
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> int:
    parser = ScriptParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="timed steps of each row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--size", default="tiny")
    args = parser.parse_args()
    at_least(parser, args, 1, "rounds", "threads", "batch", "seq")
    at_least(parser, args, 0, "warmup")
    torch.set_num_threads(args.threads)
    free, load_before = FreeKernels(), load()
    times, finite = measure(args, free)
    per_step = {name: count / args.rounds for name, count in free.calls.items()}
    if per_step.get("_int_mm", 0) == 0 or per_step.get("scale_rows_cols", 0) == 0:
        # the int8 path no longer reaches the overridden kernels: the rows would bound nothing
        raise UsageError(
            f"the overridden kernels were not called ({dict(free.calls)}); the int8 recipe no "
            "longer runs aten::_int_mm and lowbit::scale_rows_cols on the CPU; fix: override "
            "the kernels it runs now in benchmarks/int8_bound.py"
        )
    print(
        f"Command: `{command_line()}`. CPU: {cpu_description()}, {torch.get_num_threads()} "
        f"thread(s), torch {torch.__version__}, load average {load_before} before and {load()} "
        f"after. Model `{args.size}`, batch {args.batch} x {args.seq}, AdamW; {args.rounds} "
        f"rounds of one step of each row after {args.warmup} warm-up step(s) per model. Overridden "
        f"calls per free step: _int_mm {per_step['_int_mm'] / 2:g}, scale_rows_cols "
        f"{per_step['scale_rows_cols']:g}. Parameters finite after the run: "
        + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in finite.items())
        + ".\n\n"
        + table(times)
    )
    return 0


if __name__ == "__main__":
    run_script(main)
