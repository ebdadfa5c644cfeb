"""The trainer's time per step against a minimal hand-written loop, same model, recipe and batch.

Both run in one process and alternate step by step: after each trainer step (the whole loop body of
`lowbit.train.Trainer.fit`: lr schedule, micro-batch, the precision hooks, ``.item()``, JSONL and
TensorBoard records, progress bar, eval/save checks) a callback runs one step of the hand-written
loop on an identical second model. The trainer's step time is the time between callbacks minus the
callback itself, so machine noise hits both alike. Eval and checkpoints are kept out of the timed
window (they happen at the end). Target: overhead below 3%.

    .venv/bin/python benchmarks/trainer_overhead.py [--steps 40] [--recipe bf16-mixed]
        [--batch-size 16] [--seq-len 256] [--warmup 5]
"""

from __future__ import annotations

import shlex
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from benchmarks_md import DefaultsFormatter, ScriptParser, at_least, run_script

import lowbit
from lowbit.data import LMBatches, build_tokenizer, load_corpus, tokenize_split
from lowbit.models import build_causal_lm
from lowbit.train import TrainConfig, train


class HandLoop:
    """nanoGPT-sized: batch, autocast forward, loss, backward, clip, step, zero_grad."""

    def __init__(self, recipe, tokens, batch_size, seq_len, lr):
        self.precision = lowbit.Precision(lowbit.get_recipe(recipe))
        self.model = self.precision.convert(build_causal_lm("tiny", 257, seed=0))
        self.optimizer = self.precision.wrap_optimizer(
            torch.optim.AdamW(self.model.parameters(), lr=lr)
        )
        self.batches = LMBatches(tokens, batch_size, seq_len, seed=0)

    def step(self) -> None:
        x, y = next(self.batches)
        with self.precision.autocast():
            logits = self.model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.precision.backward(loss)
        self.precision.clip_grad_norm_(self.optimizer, 1.0)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)


def measure(args) -> tuple[list[float], list[float]]:
    tokens = tokenize_split(build_tokenizer("byte"), load_corpus().texts("train"))
    hand = HandLoop(args.recipe, tokens, args.batch_size, args.seq_len, 1e-3)
    trainer_times: list[float] = []
    hand_times: list[float] = []
    marks = {"exit": None}

    def alternate(trainer):
        enter = time.perf_counter()
        if marks["exit"] is not None and trainer.step_idx > args.warmup:
            trainer_times.append(enter - marks["exit"])
        start = time.perf_counter()
        hand.step()
        if trainer.step_idx > args.warmup:
            hand_times.append(time.perf_counter() - start)
        marks["exit"] = time.perf_counter()

    total = args.steps + args.warmup + 1  # the last step carries the final eval and checkpoint
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(
            recipe=args.recipe,
            steps=total,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            eval_interval=total,
            eval_batches=1,
            out=f"{folder}/run",
        )
        train(config, quiet=args.quiet, on_step=alternate)
    return trainer_times[:-1], hand_times[:-1]


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--recipe", default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each loop")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first (the first is never timed)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--quiet", action="store_true", help="time the trainer without its bar")
    args = parser.parse_args(argv)
    # A trainer step is timed from the end of the one before, so the first is never timed: with
    # --warmup 0 one timed step fewer, and --steps 1 was `StatisticsError: no median`.
    # --batch-size 0 was refused as "batch_size", a name it has not
    at_least(parser, args, 1, "steps", "warmup", "batch_size", "seq_len")
    trainer_times, hand_times = measure(args)
    t_med, h_med = statistics.median(trainer_times), statistics.median(hand_times)
    t_mean, h_mean = statistics.fmean(trainer_times), statistics.fmean(hand_times)
    command = " ".join(
        ["python", "benchmarks/trainer_overhead.py", *map(shlex.quote, argv or sys.argv[1:])]
    )
    print(
        f"\nTrainer overhead, causal-lm tiny, {args.recipe}, batch {args.batch_size} x "
        f"{args.seq_len}, {len(trainer_times)} alternating steps, torch {torch.__version__}\n"
    )
    print("| loop | median s/step | mean s/step |")
    print("|---|---:|---:|")
    print(f"| hand-written | {h_med:.4f} | {h_mean:.4f} |")
    print(f"| lowbit trainer | {t_med:.4f} | {t_mean:.4f} |")
    print(
        f"| **overhead** | **{100 * (t_med / h_med - 1):+.1f}%** | {100 * (t_mean / h_mean - 1):+.1f}% |"
    )
    print(f"\nCommand: `{command}`")  # as BENCHMARKS.md and the other scripts write it
    return 0


if __name__ == "__main__":
    run_script(main)
