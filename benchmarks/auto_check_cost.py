"""What one `auto` check step costs against a plain step of the same run (measured).

Under ``--recipe auto`` the controller observes one step every ``CHECK_INTERVAL`` (25) steps and
quantizes each converted operand to its current format and the ladder's rungs
(docs/diagnostics.md, "The `auto` recipe"). One trainer on the parity study's causal-LM workload
(Llama size ``nano``, ``--batch-size`` x ``--seq-len`` tokens, ``--threads`` threads) runs
``--checks`` check intervals; reported: the mean time of the check steps and of the plain steps
(the first two steps, which allocate and carry the trainer's one-off memory report, are not
counted), their ratio, and the share a check adds to a run (``(ratio - 1) / 25``).

    .venv/bin/python benchmarks/auto_check_cost.py [--recipe auto] [--checks 2] [--threads 1]
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from benchmarks_md import DefaultsFormatter, ScriptParser, at_least, run_script

from lowbit.diagnostics.auto import CHECK_INTERVAL
from lowbit.train import TrainConfig
from lowbit.train.trainer import Trainer


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--recipe", default="auto")
    parser.add_argument("--checks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    if args.recipe.split(":")[0] != "auto":  # another recipe has no check steps to time
        parser.error(f"--recipe {args.recipe}: not an auto recipe (auto, auto:fp6, auto:fp4)")
    at_least(parser, args, 1, "checks", "threads", "batch_size", "seq_len")
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        recipe=args.recipe,
        model="nano",
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        device="cpu",
        steps=10**6,
        out=tempfile.mkdtemp(prefix="lowbit-auto-"),
    )
    trainer = Trainer(config, quiet=True)
    check, plain = [], []
    for _ in range(args.checks * CHECK_INTERVAL):
        t0 = time.perf_counter()
        trainer.step()
        seconds = time.perf_counter() - t0
        if trainer.step_idx <= 2:
            continue
        (check if trainer.step_idx % CHECK_INTERVAL == 0 else plain).append(seconds)
    ratio = statistics.mean(check) / statistics.mean(plain)
    print(
        f"recipe {args.recipe}, nano, batch {args.batch_size} x {args.seq_len}, "
        f"{args.threads} thread(s): check step {statistics.mean(check):.3f} s "
        f"({len(check)} measured), plain step {statistics.mean(plain):.3f} s "
        f"({len(plain)} measured), ratio {ratio:.1f}x, "
        f"a check every {CHECK_INTERVAL} steps adds {(ratio - 1) / CHECK_INTERVAL:.0%} to a run"
    )


if __name__ == "__main__":
    run_script(main)
