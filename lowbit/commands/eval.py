"""`lowbit eval RUN_DIR`: evaluate a run's checkpoint on its validation or test split, or on new
data (--data)."""

from __future__ import annotations

import argparse
import json
import os

from lowbit.errors import check_given

NAME = "eval"
HELP = (
    "Evaluate a run's checkpoint: loss and perplexity (causal-lm), accuracy and per-label report "
    "(classification)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder (lowbit train --out), or a folder lowbit quantize/prune wrote",
    )
    parser.add_argument(
        "--split",
        default="validation",
        help="validation (default), test or train (of --data: a folder's or glob's split)",
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="evaluate on this data instead of the run's (the kinds lowbit train --data takes for "
        "the task): one file whole, or a folder's or glob's --split; with the run's tokenizer or "
        "vocabulary, tags and --seq-len",
    )
    parser.add_argument(
        "--text-field",
        metavar="FIELD",
        help="the field of --data's JSON records that holds the text (default: the run's "
        "--text-field; a.b: b in a)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="a checkpoint: its path, its file name in the run's checkpoints/, or its step number "
        "(default: the latest)",
    )
    parser.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="evaluate only this many batches (default, or 0: the whole split)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="device (default: the run's; cpu for a quantized or pruned folder)",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON line")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (on a terminal) or note of a large split's batches",
    )


def run(args) -> int:
    from lowbit.train import evaluate_run
    from lowbit.train.logging import json_number

    check_given(args.run_dir, "RUN_DIR")
    check_given(args.checkpoint, "--checkpoint")
    check_given(args.data, "--data")
    # a quoted ~ (`lowbit eval '~/runs/x'`, or a script's argument) is the home folder, as the
    # shell expands an unquoted one; a step number or file name passes through unchanged
    run_dir = os.path.expanduser(args.run_dir)
    checkpoint = args.checkpoint and os.path.expanduser(args.checkpoint)
    data = args.data and os.path.expanduser(args.data)
    metrics, text = evaluate_run(
        run_dir,
        args.split,
        checkpoint,
        args.max_batches,
        args.device,
        progress=not args.quiet,
        data=data,
        text_field=args.text_field,
    )
    print(json.dumps(json_number(metrics)) if args.json else text)
    return 0
