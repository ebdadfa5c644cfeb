"""A converted model's training step eager and under `torch.compile(model)`, side by side.

Per task and recipe, two copies of the same model (seed 0), each converted and with its own
`Precision` and AdamW, run the README's loop (autocast, `precision.backward`, clipping,
`precision.step`) on the same batches, the compiled copy through `torch.compile(model)`
(inductor, its default backend): three warm-up steps each (the compile, a delayed-scaling
history's start), then steps alternated between the two. Reported: the median step time of each,
their ratio (above 1: the compiled step is faster), whether the losses of every step have the same
bits, and the graphs Dynamo compiled and the graph breaks. Tasks: the digits CNN (`build_cnn`,
batch 64 of 1 x 8 x 8) and the one-block nano causal LM (batch 4 x 64). One thread; the first
call compiles for a minute or more per row on a CPU. Writes the "Compiled step" section of
BENCHMARKS.md with ``--write``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_step.py [--tasks cnn,lm]
        [--recipes fp32,bf16-mixed,fp8-tensorwise,mxfp8] [--steps 20] [--write]
"""

from __future__ import annotations

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

import lowbit
from lowbit.errors import choose
from lowbit.report.compare import parse_recipes

SECTION = "## Compiled step (benchmarks/compile_step.py)"
TASKS = ("cnn", "lm")
WARMUP = 3


def model_and_batches(task: str) -> tuple[torch.nn.Module, list, object]:
    """A fresh model of ``task`` (seed 0), 4 batches and the loss of a batch."""
    torch.manual_seed(0)
    draw = torch.Generator().manual_seed(0)
    if task == "cnn":
        from lowbit.models.cnn import build_cnn

        batches = [
            (torch.randn(64, 1, 8, 8, generator=draw), torch.randint(0, 10, (64,), generator=draw))
            for _ in range(4)
        ]
        return (
            build_cnn("small"),
            batches,
            lambda model, b: F.cross_entropy(model(b[0]).float(), b[1]),
        )
    from transformers import LlamaForCausalLM

    from lowbit.models.causal_lm import model_config

    config = model_config("nano", 257)
    config.num_hidden_layers = 1
    config._attn_implementation = "sdpa"
    batches = [torch.randint(0, 257, (4, 64), generator=draw) for _ in range(4)]
    return LlamaForCausalLM(config), batches, lambda model, b: model(b, labels=b).loss


def measure(task: str, recipe: str, steps: int) -> dict:
    from torch._dynamo.utils import counters, graph_break_reasons

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for kind in ("eager", "compiled"):
        model, batches, loss_of = model_and_batches(task)
        precision = lowbit.Precision(recipe)
        model = precision.convert(model)
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
        runs[kind] = (torch.compile(model) if kind == "compiled" else model, precision, optimizer)
    losses, times = {"eager": [], "compiled": []}, {"eager": [], "compiled": []}

    def step(kind: str, i: int) -> None:
        model, precision, optimizer = runs[kind]
        torch.manual_seed(100 + i)  # the same stochastic-rounding draws in both
        start = time.perf_counter()
        with precision.autocast():
            loss = loss_of(model, batches[i % len(batches)])
        precision.backward(loss)
        precision.clip_grad_norm_(optimizer, 1.0)
        precision.step(optimizer)
        optimizer.zero_grad()
        if i >= WARMUP:
            times[kind].append(time.perf_counter() - start)
        losses[kind].append(loss.item())

    for i in range(WARMUP + steps):
        for kind in ("eager", "compiled") if i % 2 else ("compiled", "eager"):
            step(kind, i)
    eager, compiled = (statistics.median(times[kind]) for kind in ("eager", "compiled"))
    return {
        "eager": eager,
        "compiled": compiled,
        "same": losses["eager"] == losses["compiled"],
        "diff": max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])),
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": len(graph_break_reasons),
    }


def table(rows: list[tuple[str, str, dict]], steps: int) -> str:
    lines = [
        f"Command: `{command_line()}`. CPU: {cpu_description()}, {torch.get_num_threads()} "
        f"thread(s), torch {torch.__version__}. Median of {steps} alternated steps after "
        f"{WARMUP} warm-up steps; ratio = eager / compiled (above 1: compiled faster); losses: "
        f"all {WARMUP + steps} steps' losses bit for bit, else their largest difference.",
        "",
        "| task | recipe | eager ms | compiled ms | ratio | losses | graphs | breaks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, recipe, r in rows:
        same = "same bits" if r["same"] else f"{r['diff']:.1e} off"
        lines.append(
            f"| {task} | {recipe} | {r['eager'] * 1e3:.1f} | {r['compiled'] * 1e3:.1f} | "
            f"{r['eager'] / r['compiled']:.2f} | {same} | {r['graphs']} | {r['breaks']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="cnn, lm or both")
    parser.add_argument("--recipes", default="fp32,bf16-mixed,fp8-tensorwise,mxfp8")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    at_least(parser, args, 1, "steps")
    tasks = args.tasks.split(",")
    for task in tasks:
        choose("task", task, TASKS, fix="--tasks cnn,lm")
    recipes = parse_recipes(args.recipes)
    rows = [(t, r, measure(t, r, args.steps)) for t in tasks for r in recipes]
    publish(SECTION, table(rows, args.steps), args.write)


if __name__ == "__main__":
    run_script(main)
