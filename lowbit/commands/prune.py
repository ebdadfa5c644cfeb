"""`lowbit prune RUN_DIR --sparsity S | --pattern 2:4`: magnitude pruning, with its cost."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from lowbit.errors import UsageError

NAME = "prune"
HELP = (
    "Magnitude-prune a run's linear layers (unstructured to a sparsity, or N:M such as 2:4) into "
    "a new folder, and evaluate the change."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (lowbit train --out)")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--sparsity", type=float, help="fraction of weights to zero, e.g. 0.5")
    rule.add_argument("--pattern", help="N:M structured sparsity, e.g. 2:4")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR-sparse50 ...)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace what an earlier quantize, prune or export wrote in --out (other files stay)",
    )
    parser.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="validation batches for the evaluation (default: the run's eval_batches; 0: all)",
    )


def run(args) -> int:
    from lowbit.infer import compare, prune_run
    from lowbit.train.evaluate import check_max_batches, check_same_data

    check_max_batches(args.max_batches)  # before anything is written
    # a quoted ~ (`--out=~/q`, where the shell expands none, or a script's argument) is the
    # home folder, as `lowbit eval` and `lowbit train` read it: it named a folder ~ here
    out = args.out and os.path.expanduser(args.out)
    result = prune_run(
        os.path.expanduser(args.run_dir), args.sparsity, args.pattern, out, args.force
    )
    m = result.manifest
    print(f"lowbit prune: {result.source.describe()} -> {result.out}")
    print(
        f"  {m['pruning']['rule']} magnitude pruning ({m['pruning']['sparsity']:.1%} of linear "
        f"weights are zero): {result.report.summary('pruned')}"
    )
    # in fp32, whatever the run stored: a bf16-pure run's pruned folder is twice its checkpoint's
    size = m["bytes"]
    print(
        f"  tensors: {m['source']['original']} {size['original'] / 1e6:.3f} MB -> "
        f"{size['quantized'] / 1e6:.3f} MB, stored dense in fp32 (zeros included); quantize it "
        "to shrink it"
    )
    batches = result.source.config.eval_batches if args.max_batches is None else args.max_batches
    try:
        # the run's data edited since it trained: the reference's numbers would be of other data
        # than the run's (as `lowbit eval` refuses them), so the same note as for data gone
        source = result.source
        check_same_data(source.path, source.config, source.task.fingerprint)
        _, lines = compare(
            result.source.task, result.model, result.reference, "validation", batches or None
        )
    except UsageError as error:  # the data the run read is gone, moved or edited: it is written
        out = shlex.quote(str(result.out))
        print(f"  validation: not evaluated ({error}); later: lowbit eval {out}", file=sys.stderr)
        return 0
    counted = "all batches" if not batches else f"{batches} batch" + "es" * (batches > 1)
    print(f"  validation ({counted}), reference = the unpruned run:")
    print("\n".join("    " + line for line in lines))
    return 0
