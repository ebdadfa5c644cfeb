"""PyTorch ops per training step of each recipe on the GPU's code path, counted on a CPU.

On a GPU, lowbit quantizes with PyTorch ops (the fused kernels in `lowbit/kernels` are CPU code),
and a small or medium model's step is bound by launching those ops' kernels (docs/gpu.md: an fp8
step on an H200 spent 419 ms launching against 172 ms of kernels). Each op is one kernel launch
there, so the count is what GPU work on this path can be measured by without a GPU. The step runs
with the fused kernels switched off (`lowbit.kernels.disabled()`, the path CUDA tensors take) and
the choices lowbit makes on a GPU (PyTorch's conversions for fp8 e4m3 too, max |x| by one norm
reduction), under a dispatch mode that counts every ATen op that is not a view or a bare
allocation. What still differs from a GPU: its native fp8 GEMMs (a cast per operand and
``torch._scaled_mm``, where the CPU runs a bf16 GEMM and scales it) and a few CPU-only shortcuts.
The step is `recipe_speed.py`'s (model `tiny`, AdamW, gradient clipping, stdlib bytes), counted
after two warm-up steps.

    .venv/bin/python benchmarks/ops_per_step.py [--recipes a,b] [--write]
"""

from __future__ import annotations

import collections
import contextlib
import sys

import torch
from benchmarks_md import (
    DefaultsFormatter,
    ScriptParser,
    at_least,
    command_line,
    publish,
    run_script,
)
from recipe_speed import Run
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit
from lowbit import kernels
from lowbit.data import build_tokenizer, load_corpus, tokenize_split

# Ops that allocate and launch nothing (a GPU's caching allocator hands out memory without a kernel)
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it, views and bare allocations excepted."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in ALLOCATIONS:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gpu_choices():
    """The choices lowbit makes for a CUDA device: rounding through PyTorch's conversions
    (`cast._native_conversion_is_fast`: every float dtype) and max |x| by one norm reduction
    (`qtensor._abs_max_in_one_op`)."""
    cast_module = sys.modules["lowbit.formats.cast"]  # `lowbit.formats.cast` is also a function
    qtensor_module = sys.modules["lowbit.formats.qtensor"]
    saved = cast_module._native_conversion_is_fast, qtensor_module._abs_max_in_one_op
    cast_module._native_conversion_is_fast = lambda dtype, device: dtype.is_floating_point
    qtensor_module._abs_max_in_one_op = lambda device: True
    try:
        yield
    finally:
        cast_module._native_conversion_is_fast, qtensor_module._abs_max_in_one_op = saved


def count(recipe: str, tokens: torch.Tensor, batch: int, seq: int) -> collections.Counter:
    """The ops of one step of `recipe_speed`'s training step (after two warm-up steps)."""
    run = Run(recipe, tokens, batch, seq, "tiny", "cpu")
    with kernels.disabled(), gpu_choices():
        run.step()
        run.step()
        with OpCounter() as counter:
            run.step()
    return counter.ops


def main() -> None:
    parser = ScriptParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument(
        "--recipes", default=",".join(lowbit.recipe_names()), help="default: every preset"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--note", default="", help="text written under the table")
    args = parser.parse_args()
    at_least(parser, args, 1, "batch", "seq")  # --batch 0 was a reshape traceback
    rows = ["| recipe | ops per step | most frequent |", "|---|---:|---|"]
    tokens = tokenize_split(build_tokenizer("byte"), load_corpus().texts("train"))
    for name in args.recipes.split(","):
        ops = count(name, tokens, args.batch, args.seq)
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(3))
        rows.append(f"| {name} | {sum(ops.values())} | {top} |")
    text = (
        f"Model `tiny`, batch {args.batch} x {args.seq}, `recipe_speed.py`'s step (AdamW, "
        "gradient clipping), one step with the fused CPU "
        "kernels off and the GPU's choices (the path CUDA tensors take).\n"
        f"Command: `{command_line().split(' --note')[0]}`\n\n" + "\n".join(rows)
    )
    if args.note:
        text += f"\n\n{args.note}"
    publish("## PyTorch ops per step (benchmarks/ops_per_step.py)", text, args.write)


if __name__ == "__main__":
    run_script(main)
