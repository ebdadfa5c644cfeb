"""`lowbit export RUN_DIR_or_QUANT_DIR --out DIR`: a Hugging Face folder of a causal LM."""

from __future__ import annotations

import argparse
import os

NAME = "export"
HELP = (
    "Write a causal LM (a run, or a quantized/pruned folder, dequantized) as a Hugging Face "
    "folder that AutoModelForCausalLM.from_pretrained loads, with the run's tokenizer files."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR_or_QUANT_DIR", help="what to export")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument(
        "--dtype",
        default="fp32",
        help="fp32 (default), bf16 or fp16 (fp16 holds |w| up to 65504 only)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="50GB",
        metavar="SIZE",
        help="split larger weights into model-0000N-of-0000M.safetensors files of at most SIZE "
        "each, e.g. 5GB (default 50GB, as transformers)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace what an earlier quantize, prune or export wrote in --out (other files stay)",
    )


def run(args) -> int:
    from lowbit.infer import export_hf

    # a quoted ~ (`--out=~/q`, where the shell expands none, or a script's argument) is the
    # home folder, as `lowbit eval` and `lowbit train` read it: it named a folder ~ here
    out = os.path.expanduser(args.out)
    info = export_hf(
        os.path.expanduser(args.source), out, args.dtype, args.force, args.max_shard_size
    )
    print(f"lowbit export: {info['source']} (step {info['step']}) -> {out}")
    shards = sum(name.endswith(".safetensors") for name in info["files"])  # --max-shard-size
    size = f"{info['bytes'] / 1e6:.3f} MB" + (f" in {shards} files" if shards > 1 else "")
    if info["quantization"]:
        q = info["quantization"]
        print(
            f"  weights: {q['format']} dequantized to {info['dtype']}, {size} (transformers has "
            f"no matching {q['format']} format here); the recipe is in lowbit_export.json"
        )
        if q["mode"] == "weights-and-activations":
            print("  activation quantization is not exported: transformers runs plain GEMMs")
    else:  # a bf16-low run's fp32 masters, as quantize and prune say
        print(f"  weights: {info['original']} written as {info['dtype']}, {size}")
    if info["tokenizer_files"]:
        print(f"  tokenizer files: {', '.join(info['tokenizer_files'])}")
    print(f"  load: AutoModelForCausalLM.from_pretrained({out!r})")
    return 0
