"""Cost of per-operand numerics statistics (`--stats-interval`) on the training step.

Two trainers with the same model, recipe and batches run side by side in one process, alternating
step by step: one without statistics, one with statistics every ``--interval`` steps (the default
of ``lowbit train --stats-interval``), its records written to ``metrics.jsonl`` and TensorBoard as
`Trainer.fit` writes them. Reported: the mean step time of each over whole intervals, their ratio
(the amortized overhead; target below 15%), and the cost of one observed step relative to a plain
one (so the overhead at another interval K is about ``(observed - 1) / K``). Writes the
"Statistics overhead" section of BENCHMARKS.md with ``--write``.

    .venv/bin/python benchmarks/stats_overhead.py [--recipe fp8-tensorwise] [--intervals 2]
        [--interval 50] [--batch-size 8] [--seq-len 128] [--write]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchmarks_md import (
    DefaultsFormatter,
    ScriptParser,
    at_least,
    command_line,
    publish,
    run_script,
)

from lowbit.diagnostics.stats import DEFAULT_INTERVAL
from lowbit.train import TrainConfig
from lowbit.train.logging import MetricsLogger
from lowbit.train.trainer import Trainer

SECTION = "## Statistics overhead (benchmarks/stats_overhead.py)"


def measure(args) -> dict:
    # the observed trainer's metrics.jsonl and TensorBoard files: each run (a refused one too)
    # left a lowbit-stats-* folder behind in the temporary directory
    with tempfile.TemporaryDirectory(prefix="lowbit-stats-") as folder:
        return _measure(args, Path(folder))


def _measure(args, folder: Path) -> dict:
    common = dict(
        recipe=args.recipe,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        device="cpu",
        steps=10**6,
    )
    plain = Trainer(TrainConfig(**common, out=str(folder / "plain")), quiet=True)
    observed = Trainer(
        TrainConfig(**common, out=str(folder / "stats"), stats_interval=args.interval), quiet=True
    )
    (folder / "stats").mkdir(parents=True)
    logger = MetricsLogger(folder / "stats", {})
    # Warm-up, not timed: the first step allocates, the second carries `Trainer.step`'s one-off
    # memory report (an extra forward and backward that would land in both arms' means).
    for _ in range(2):
        for trainer in (plain, observed):
            trainer.step()
    t_plain, t_on, t_observed_steps, t_plain_same = [], [], [], []
    for _ in range(args.intervals * args.interval):
        t0 = time.perf_counter()
        plain.step()
        t1 = time.perf_counter()
        observed.step()
        for split, record in observed.records:
            logger.log(observed.step_idx, split, record)
        t2 = time.perf_counter()
        t_plain.append(t1 - t0)
        t_on.append(t2 - t1)
        if observed.step_idx % args.interval == 0:
            t_observed_steps.append(t2 - t1)
            t_plain_same.append(t1 - t0)
    logger.close()
    return {
        "plain": statistics.mean(t_plain),
        "on": statistics.mean(t_on),
        "overhead": statistics.mean(t_on) / statistics.mean(t_plain) - 1,
        "observed_ratio": statistics.mean(t_observed_steps) / statistics.mean(t_plain_same),
        "observed_steps": len(t_observed_steps),
    }


def table(args, r: dict) -> str:
    # lowbit train's own interval is "(default)"; every --interval was labelled so
    default = " (default)" if args.interval == DEFAULT_INTERVAL else ""
    return "\n".join(
        [
            f"`{command_line()}`: causal-lm tiny, recipe {args.recipe}, batch {args.batch_size} x "
            f"{args.seq_len}, {args.intervals * args.interval} alternating steps, "
            f"{torch.get_num_threads()} threads (CPU, shared machine).",
            "",
            "| statistics | mean step (s) | vs off |",
            "|---|---|---|",
            f"| off | {r['plain']:.3f} | 1.00 |",
            f"| every {args.interval} steps{default}, with JSONL + TensorBoard | {r['on']:.3f} | "
            f"{1 + r['overhead']:.3f} ({r['overhead']:+.1%}) |",
            f"| one observed step ({r['observed_steps']} measured) | - | "
            f"{r['observed_ratio']:.2f} |",
            "",
            f"An observed step costs {r['observed_ratio']:.2f}x a plain one, so the overhead at "
            f"an interval K is about {r['observed_ratio'] - 1:.2f} / K. Off, no observer is "
            "attached and the layers run no extra code.",
        ]
    )


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--recipe", default="fp8-tensorwise")
    parser.add_argument("--interval", type=int, default=DEFAULT_INTERVAL)
    parser.add_argument("--intervals", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    # an --interval 0 measured no step: a StatisticsError
    at_least(parser, args, 1, "interval", "intervals", "batch_size", "seq_len")
    result = measure(args)
    publish(SECTION, table(args, result), args.write)


if __name__ == "__main__":
    run_script(main)
