"""`lowbit quantize RUN_DIR --to FORMAT`: post-training quantization to a new folder."""

from __future__ import annotations

import argparse
import os
import shlex

NAME = "quantize"
HELP = (
    "Quantize a run's linear layers after training (int8, int4, fp8, mxfp4, nvfp4) into a new "
    "folder that lowbit eval/generate/export read; prints its size against the original."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lowbit.infer import targets

    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder or a pruned folder")
    parser.add_argument("--to", required=True, metavar="FORMAT", help=" | ".join(targets()))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--weights-only",
        dest="mode",
        action="store_const",
        const="weights-only",
        help="quantize weights, keep fp32 activations (default)",
    )
    mode.add_argument(
        "--weights-and-activations",
        dest="mode",
        action="store_const",
        const="weights-and-activations",
        help="also quantize activations per token at run time (int8: real int8 GEMMs)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="G",
        help="elements of each row that share a scale (default: int4 32, int8/fp8 one per row; "
        "mxfp4 32 and nvfp4 16 are fixed)",
    )
    parser.add_argument(
        "--pad-groups",
        action="store_true",
        default=None,
        help="zero-pad the last group of rows the group size does not divide",
    )
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR-FORMAT)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace what an earlier quantize, prune or export wrote in --out (other files stay)",
    )


def run(args) -> int:
    from lowbit.infer import quantize_run
    from lowbit.infer.evaluate import size_change

    # a quoted ~ (`--out=~/q`, where the shell expands none, or a script's argument) is the
    # home folder, as `lowbit eval` and `lowbit train` read it: it named a folder ~ here
    result = quantize_run(
        os.path.expanduser(args.run_dir),
        args.to,
        args.mode or "weights-only",
        args.group_size,
        args.pad_groups,
        args.out and os.path.expanduser(args.out),
        args.force,
    )
    m = result.manifest
    total, linear = m["bytes"], m["linear_bytes"]
    print(f"lowbit quantize: {result.source.describe()} -> {result.out}")
    q = m["quantization"]
    group = f"groups of {q['group_size']}" if q["group_size"] else "one scale per row"
    print(f"  {q['format']} {q['mode']}, {group}: {result.report.summary('quantized')}")
    # against what the quantization started from: a bf16-low run's fp32 master weights, not the
    # 16-bit parameters its checkpoint also holds (lowbit.infer.io.load_source); tensor bytes on
    # both sides, the file's header left out (`lowbit.infer.io.tensor_bytes_of`)
    print(
        f"  tensors:           {m['source']['original']} {total['original'] / 1e6:.3f} MB -> "
        f"{total['quantized'] / 1e6:.3f} MB, {size_change(total['original'], total['quantized'])} "
        "(model.safetensors less its header)"
    )
    print(
        f"  linear weights:    {linear['original'] / 1e6:.3f} MB -> "
        f"{linear['quantized'] / 1e6:.3f} MB, {size_change(linear['original'], linear['quantized'])}"
    )
    out = shlex.quote(str(result.out))  # a command to paste into a shell
    print(f"  next: lowbit eval {out}   (metric change against the original)")
    return 0
