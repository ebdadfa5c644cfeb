"""Step time of the default causal-lm workload per recipe, as a ratio to fp32, in one run.

The default workload is `lowbit train`'s: the tiny Llama on byte-level stdlib text, batch 16 x 256.
Recipes are measured round-robin (one timed step of each in turn, several rounds) so that the
machine's noise hits every recipe alike; the table reports the median step time per recipe.

    .venv/bin/python benchmarks/recipe_speed.py [--rounds 8] [--recipes a,b,c] [--write]
    .venv/bin/python benchmarks/recipe_speed.py --profile fp8-tensorwise   # where a step goes
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

# What `import lowbit` (and so the `lowbit` command) sets before torch allocates: transparent huge
# pages for large CPU tensors (see lowbit/__init__.py); torch is imported first here.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.nn.functional as F
from benchmarks_md import cpu_description, write_section

import lowbit
from lowbit.data import LMBatches, build_tokenizer, load_corpus, tokenize_split
from lowbit.models import build_causal_lm


class Run:
    """One recipe's model, optimizer and data, stepped one at a time."""

    def __init__(self, recipe: str, tokens: torch.Tensor, batch: int, seq: int, size: str):
        self.precision = lowbit.Precision(recipe)
        self.model = self.precision.convert(build_causal_lm(size, 257, seed=0))
        self.optimizer = self.precision.wrap_optimizer(
            torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        )
        self.batches = LMBatches(tokens, batch, seq, seed=0)

    def step(self) -> float:
        x, y = next(self.batches)
        start = time.perf_counter()
        with self.precision.autocast():
            logits = self.model(x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.precision.backward(loss)
        self.precision.clip_grad_norm_(self.optimizer, 1.0)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def measure(recipes, rounds, warmup, batch, seq, size):
    tokens = tokenize_split(build_tokenizer("byte"), load_corpus().texts("train"))
    runs = {name: Run(name, tokens, batch, seq, size) for name in recipes}
    for run in runs.values():
        for _ in range(warmup):
            run.step()
    # The models' Python objects never die during the measurement: keep them out of the cyclic
    # garbage collector, whose full passes would otherwise grow with the number of recipes.
    gc.collect()
    gc.freeze()
    times = {name: [] for name in recipes}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run.step())
    return {name: statistics.median(t) for name, t in times.items()}


def table(medians: dict[str, float], baseline: str) -> str:
    lines = ["| recipe | step time (ms) | ratio to fp32 |", "|---|---:|---:|"]
    for name, seconds in medians.items():
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / medians[baseline]:.2f} |")
    return "\n".join(lines)


def profile(recipe: str, warmup: int, batch: int, seq: int, size: str, steps: int) -> None:
    """Print where ``steps`` steps of ``recipe`` spend their time (torch.profiler, ops by self
    time; divide by ``steps`` for one step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tokens = tokenize_split(build_tokenizer("byte"), load_corpus().texts("train"))
    run = Run(recipe, tokens, batch, seq, size)
    for _ in range(warmup):
        run.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run.step()
    print(f"{recipe}: {steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(lowbit.recipe_names()))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--note", default="", help="text written under the table (with --write)")
    parser.add_argument("--profile", metavar="RECIPE", help="profile steps of RECIPE instead")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps --profile covers")
    args = parser.parse_args()
    if args.profile:
        profile(args.profile, args.warmup, args.batch, args.seq, args.size, args.profile_steps)
        return 0
    recipes = args.recipes.split(",")
    if "fp32" not in recipes:
        recipes.insert(0, "fp32")
    medians = measure(recipes, args.rounds, args.warmup, args.batch, args.seq, args.size)
    command = "python " + " ".join(["benchmarks/recipe_speed.py", *sys.argv[1:]])
    text = (
        f"Model `{args.size}`, batch {args.batch} x {args.seq} tokens, AdamW, median of "
        f"{args.rounds} round-robin steps, {torch.get_num_threads()} threads, "
        f"{cpu_description()}.\n"
        f"Command: `{command.split(' --note')[0]}`\n\n{table(medians, 'fp32')}"
    )
    print(text)
    if args.write:
        size = "" if args.size == "tiny" else f", model `{args.size}`"
        heading = f"## Recipe step time{size} (benchmarks/recipe_speed.py)"
        write_section(heading, text + (f"\n\n{args.note}" if args.note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
