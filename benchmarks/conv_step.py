"""What a converted CNN's training step holds and takes on the CPU, per recipe.

    OMP_NUM_THREADS=1 python benchmarks/conv_step.py [--batch-size 32]

Memory, from the CPU allocator (`lowbit.memory.measure.Allocations`, the third step of SGD): the
bytes live at the start of the backward above those at the step's start (what the forward left
for the backward: the saved activations and anything else still alive, such as a shared
quantization slot, which `measure_activations`' saved-tensor count does not see), and the step's
peak rise above its start; for the digits CNN (`build_cnn("small")`, batch 256 of 1 x 8 x 8) and
a net of 6 3x3 convolutions (16 channels, batch 64 of 3 x 16 x 16). Time: the median thread time
of a digits CNN step (batch --batch-size, 32 by default; AdamW) over steps 21-160, forward to optimizer step. Run it with
PYTHONPATH set to another checkout's tree to compare versions (alternate the runs: a shared
machine's timings drift).
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.memory.measure import Allocations
from lowbit.models.cnn import build_cnn

RECIPES = ("fp32", "fp8-tensorwise", "fp8-rowwise", "mxfp8", "int8")


def six_convs() -> nn.Module:
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    for _ in range(5):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 16 * 16, 10))


def _trainer(model: nn.Module, recipe: str, optimizer, shape: tuple):
    """One training step of ``model`` converted under ``recipe`` on a fixed random batch of
    ``shape``, with marks "start", "backward" and "end" (of the backward) on an `Allocations` if
    given."""
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(model)
    opt = precision.wrap_optimizer(optimizer(model.parameters()))
    images, labels = torch.randn(*shape), torch.randint(0, 10, (shape[0],))

    def step(allocations: Allocations | None = None) -> None:
        if allocations:
            allocations.mark("start")
        with precision.autocast():
            loss = F.cross_entropy(model(images).float(), labels)
        if allocations:
            allocations.mark("backward")
        precision.backward(loss)
        del loss
        if allocations:
            allocations.mark("end")
        precision.step(opt)
        opt.zero_grad(set_to_none=False)

    return step


def memory(build, recipe: str, shape: tuple) -> tuple[int, int]:
    """(bytes live at the backward's start, the forward and backward's peak), above the step's
    start."""
    torch.manual_seed(0)
    step = _trainer(build(), recipe, lambda p: torch.optim.SGD(p, lr=0.01), shape)
    step()
    step()
    with Allocations() as allocations:
        step(allocations)
    start, backward, end = (allocations.marks[mark][0] for mark in ("start", "backward", "end"))
    live = sum(n for stamp, n in allocations.events if start <= stamp < backward)
    return live, allocations.rise(start, end)


def step_ms(recipe: str, batch: int = 32, steps: int = 160, skipped: int = 20) -> float:
    """The median thread time of a digits CNN step, in ms."""
    torch.manual_seed(0)
    adamw = lambda p: torch.optim.AdamW(p, lr=1e-3)  # noqa: E731
    step = _trainer(build_cnn("small"), recipe, adamw, (batch, 1, 8, 8))
    times = []
    for i in range(steps):
        start = time.thread_time_ns()
        step()
        if i >= skipped:
            times.append((time.thread_time_ns() - start) / 1e6)
    return statistics.median(times)


def main() -> None:
    from benchmarks_md import ScriptParser

    parser = ScriptParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch-size", type=int, default=32, help="the timed steps' batch")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    nets = (("digits CNN", lambda: build_cnn("small"), (256, 1, 8, 8)),)
    nets += (("6 convs", six_convs, (64, 3, 16, 16)),)
    print(
        "| net | recipe | live at backward start (B) | forward + backward peak rise (B) | step (ms) |"
    )
    print("|---|---|---:|---:|---:|")
    for name, build, shape in nets:
        for recipe in RECIPES:
            live, peak = memory(build, recipe, shape)
            ms = f"{step_ms(recipe, args.batch_size):.2f}" if name == "digits CNN" else ""
            print(f"| {name} | {recipe} | {live:,} | {peak:,} | {ms} |", flush=True)


if __name__ == "__main__":
    main()
