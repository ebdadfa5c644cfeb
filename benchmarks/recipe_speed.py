"""Step time of the default causal-lm workload per recipe, as a ratio to fp32, in one run.

The default workload is `lowbit train`'s: the tiny Llama on byte-level stdlib text, batch 16 x 256.
Each recipe is measured against fp32 side by side: one fresh process builds both, then times one
step of each in turn for several rounds (the machine's noise hits both alike) and reports the
median step time of each. The table gives, per recipe, the median over ``--processes`` such
processes of its step time and of its ratio to fp32 in the same process, with the ratio's range.

Why one recipe per process: a user trains one recipe per process. Timing all recipes round-robin in
one process (this script's first design) ran every step right after another model's step, with
twenty models' buffers in one heap; measured on one day, one recipe alone per process, these pairs
and that design agree within ~0.02 (BENCHMARKS.md, "Recipe step time"), and a pair is closer to
what a user runs while still side by side. The ratios of one process move together by a few
hundredths from one process to the next (on the 2-core VMs this project runs on, the fp32
baseline's step time depends on the process, e.g. where its buffers land), hence several processes
per recipe and the median.

    .venv/bin/python benchmarks/recipe_speed.py [--rounds 9] [--processes 3] [--recipes a,b,c] [--write]
    .venv/bin/python benchmarks/recipe_speed.py --profile fp8-tensorwise   # where a step goes
    python benchmarks/recipe_speed.py --device cuda --size llama-1b   # on a GPU: native fp8 GEMMs

On a GPU each step is timed between two ``torch.cuda.synchronize()`` calls, so the queued kernels
are counted in the step that launched them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

# What `import lowbit` (and so the `lowbit` command) sets before torch allocates: transparent huge
# pages for large CPU tensors (see lowbit/__init__.py); torch is imported first here.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
import torch.nn.functional as F
from benchmarks_md import (
    DefaultsFormatter,
    ScriptParser,
    at_least,
    cpu_description,
    run_script,
    write_section,
)

import lowbit
from lowbit.data import LMBatches, build_tokenizer, load_corpus, tokenize_split
from lowbit.models import build_causal_lm
from lowbit.report.compare import parse_recipes


class Run:
    """One recipe's model, optimizer and data, stepped one at a time."""

    def __init__(
        self, recipe: str, tokens: torch.Tensor, batch: int, seq: int, size: str, device: str
    ):
        self.device = torch.device(device)
        self.precision = lowbit.Precision(recipe, device=self.device)
        with self.device:  # initialized where it trains: a 1B model builds in seconds on a GPU
            model = build_causal_lm(size, 257, seed=0)
        self.model = self.precision.convert(model)
        self.optimizer = self.precision.wrap_optimizer(
            torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        )
        self.batches = LMBatches(tokens, batch, seq, seed=0)

    def step(self) -> float:
        x, y = (t.to(self.device) for t in next(self.batches))
        synchronize(self.device)
        start = time.perf_counter()
        with self.precision.autocast():
            logits = self.model(x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.precision.backward(loss)
        self.precision.clip_grad_norm_(self.optimizer, 1.0)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_description(device: str) -> str:
    """The GPU's name, or the CPU's model and instruction sets with the thread count."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{torch.get_num_threads()} threads, {cpu_description()}"


def measure(recipes, rounds, warmup, batch, seq, size, device):
    tokens = tokenize_split(build_tokenizer("byte"), load_corpus().texts("train"))
    runs = {name: Run(name, tokens, batch, seq, size, device) for name in recipes}
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


def in_processes(args, recipes: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Per recipe, ``args.processes`` fresh processes (this script with ``--worker``) that each time
    fp32 and that recipe side by side: the list of (recipe's median, fp32's median) in seconds."""
    others = [name for name in recipes if name != "fp32"] or ["fp32"]
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in others}
    for number, name in enumerate(others, 1):
        for index in range(args.processes):
            command = [sys.executable, __file__, "--worker", "--recipes", name]
            for option in ("rounds", "warmup", "batch", "seq", "size", "device"):
                command += [f"--{option}", str(getattr(args, option))]
            print(
                f"{name} ({number}/{len(others)}), process {index + 1}/{args.processes} ...",
                file=sys.stderr,
                flush=True,
            )
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"recipe_speed: the process for {name} failed:\n{done.stderr[-3000:]}")
            medians = json.loads(done.stdout.splitlines()[-1])
            pairs[name].append((medians[name], medians["fp32"]))
    return pairs


def table(pairs: dict[str, list[tuple[float, float]]]) -> str:
    """Per recipe: the median over its processes of the step time and of the ratio to fp32 (timed
    in the same process); the fp32 row's time is the median over all processes."""
    many = any(len(runs) > 1 for runs in pairs.values())
    head = "| recipe | step time (ms) | ratio to fp32 |" + (" ratio range |" if many else "")
    lines = [head, "|---|---:|---:|" + ("---:|" if many else "")]
    fp32 = statistics.median(base for runs in pairs.values() for _, base in runs)
    lines.append(f"| fp32 | {fp32 * 1e3:.1f} | 1.00 |" + (" 1.00-1.00 |" if many else ""))
    for name, runs in pairs.items():
        if name == "fp32":
            continue
        ratios = [time / base for time, base in runs]
        row = (
            f"| {name} | {statistics.median(time for time, _ in runs) * 1e3:.1f} "
            f"| {statistics.median(ratios):.2f} |"
        )
        lines.append(row + (f" {min(ratios):.2f}-{max(ratios):.2f} |" if many else ""))
    return "\n".join(lines)


def profile(
    recipe: str, warmup: int, batch: int, seq: int, size: str, steps: int, device: str
) -> None:
    """Print where ``steps`` steps of ``recipe`` spend their time (torch.profiler, ops by self
    time; divide by ``steps`` for one step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tokens = tokenize_split(build_tokenizer("byte"), load_corpus().texts("train"))
    run = Run(recipe, tokens, batch, seq, size, device)
    for _ in range(warmup):
        run.step()
    activities = [ProfilerActivity.CPU]
    if run.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            run.step()
    print(f"{recipe}: {steps} steps")
    sort = "self_cuda_time_total" if run.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


def main() -> int:
    parser = ScriptParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument(
        "--recipes", default=",".join(lowbit.recipe_names()), help="default: every preset"
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, per model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--note", default="", help="text written under the table (with --write)")
    parser.add_argument("--profile", metavar="RECIPE", help="profile steps of RECIPE instead")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps --profile covers")
    parser.add_argument(
        "--processes",
        type=int,
        default=3,
        help="fresh processes per recipe, each timing fp32 and the recipe (median of them)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # before any process starts: --batch 0 was a worker's traceback after the corpus was read
    at_least(parser, args, 1, "rounds", "batch", "seq", "profile_steps", "processes")
    at_least(parser, args, 0, "warmup")
    # checked before --profile builds anything: its unknown recipe or missing GPU was a traceback
    if args.profile and args.profile not in lowbit.recipe_names():
        parser.error(f"--profile: unknown recipe {args.profile}; see `lowbit recipes`")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; fix: leave --device out")
    if args.profile:
        profile(
            args.profile,
            args.warmup,
            args.batch,
            args.seq,
            args.size,
            args.profile_steps,
            args.device,
        )
        return 0
    # `--recipes ""` was "unknown recipe(s) ; see `lowbit recipes`"
    recipes = parse_recipes(args.recipes)
    if "fp32" not in recipes:
        recipes.insert(0, "fp32")
    if args.worker:  # one process's medians, as JSON on the last line
        medians = measure(
            recipes, args.rounds, args.warmup, args.batch, args.seq, args.size, args.device
        )
        print(json.dumps(medians))
        return 0
    pairs = in_processes(args, recipes)
    command = "python " + " ".join(["benchmarks/recipe_speed.py", *sys.argv[1:]])
    processes = f"{args.processes} processes" if args.processes > 1 else "1 process"
    text = (
        f"Model `{args.size}`, batch {args.batch} x {args.seq} tokens, AdamW, median of "
        f"{args.rounds} alternating steps of fp32 and the recipe per process, {processes} per "
        f"recipe, {device_description(args.device)}.\n"
        f"Command: `{command.split(' --note')[0]}`\n\n{table(pairs)}"
    )
    print(text)
    if args.write:
        size = "" if args.size == "tiny" else f", model `{args.size}`"
        if args.device != "cpu":
            size += f", {device_description(args.device)}"
        heading = f"## Recipe step time{size} (benchmarks/recipe_speed.py)"
        write_section(heading, text + (f"\n\n{args.note}" if args.note else ""))
    return 0


if __name__ == "__main__":
    run_script(main)
