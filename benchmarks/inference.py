"""Post-training quantization and pruning of a trained causal LM: size, perplexity, int8 speed.

    .venv/bin/lowbit train --out runs/bench-tiny            # once: the default tiny Llama
    .venv/bin/python benchmarks/inference.py --run runs/bench-tiny
    .venv/bin/python benchmarks/inference.py --run runs/bench-tiny --write   # update BENCHMARKS.md

For every format the run's weights are quantized in memory exactly as ``lowbit quantize`` does,
the folder is written to a temporary directory (its ``model.safetensors`` size is the size
reported), and validation perplexity is measured on the same ``--max-batches`` batches as the
fp32 reference. Speed: tokens/s of fp32 and of the int8 kernels, measured side by side in
interleaved rounds (medians; these machines are noisy, read the ratios), for batched evaluation
(16 x 256 tokens a forward, fewer where the validation split or the model's positions
hold fewer) and for greedy decoding (one sequence, one token a forward).
"""

from __future__ import annotations

import copy
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# What `import lowbit` (and so the `lowbit` command) sets before torch allocates: transparent huge
# pages for large CPU tensors (see lowbit/__init__.py); torch is imported first here.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks_md import (  # noqa: E402
    DefaultsFormatter,
    ScriptParser,
    at_least,
    command_line,
    cpu_description,
    run_script,
    write_section,
)

from lowbit.errors import a_task_run  # noqa: E402
from lowbit.infer import QuantRecipe, io, prune_model, quantize_model, set_kernel  # noqa: E402
from lowbit.infer.evaluate import fp32_precision, kernel_note  # noqa: E402
from lowbit.infer.model import parse_pattern  # noqa: E402
from lowbit.models.causal_lm import max_positions  # noqa: E402
from lowbit.train.evaluate import check_max_batches  # noqa: E402

HEADING = "## Inference (benchmarks/inference.py)"

# (label, prune rule or None, format or None, mode, group, pad)
CONFIGS = [
    ("fp32 (reference)", None, None, None, None, None),
    ("int8 weight-only", None, "int8", "weights-only", None, None),
    ("int8 W8A8", None, "int8", "weights-and-activations", None, None),
    ("fp8 e4m3 weight-only", None, "fp8", "weights-only", None, None),
    ("fp8 e4m3 W8A8", None, "fp8", "weights-and-activations", None, None),
    ("int4 g32", None, "int4", "weights-only", 32, True),
    ("int4 g64", None, "int4", "weights-only", 64, True),
    ("int4 g128", None, "int4", "weights-only", 128, True),
    ("mxfp4 weight-only", None, "mxfp4", "weights-only", None, None),
    ("mxfp4 W4A4", None, "mxfp4", "weights-and-activations", None, None),
    ("nvfp4 weight-only", None, "nvfp4", "weights-only", None, None),
    ("nvfp4 W4A4", None, "nvfp4", "weights-and-activations", None, None),
    ("pruned 50%", "0.5", None, None, None, None),
    ("pruned 2:4", "2:4", None, None, None, None),
    ("pruned 2:4 + int8", "2:4", "int8", "weights-only", None, None),
]
QUICK = {"fp32 (reference)", "int8 weight-only", "int8 W8A8", "int4 g32"}


def build(source, prune, fmt, mode, group, pad):
    model = copy.deepcopy(source.model)
    if prune is not None:
        if ":" in prune:
            prune_model(model, pattern=parse_pattern(prune))
        else:
            prune_model(model, sparsity=float(prune))
    if fmt is not None:
        quantize_model(model, QuantRecipe(fmt, mode, group, pad))
    return model


def file_size(source, model, folder) -> int:
    io.save(source, model, {"quantization": None, "source": io.source_record(source)}, folder)
    return (Path(folder) / io.WEIGHTS).stat().st_size


def quality(source, args) -> list[dict]:
    task, precision = source.task, fp32_precision()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, prune, fmt, mode, group, pad) in enumerate(CONFIGS):
            if args.quick and label not in QUICK:
                continue
            model = build(source, prune, fmt, mode, group, pad)
            metrics = task.evaluate(model, precision, "validation", args.max_batches)
            rows.append(
                {
                    "label": label,
                    "bytes": file_size(source, model, Path(tmp) / str(i)),
                    "ppl": metrics["ppl"],
                    "tokens": metrics["tokens"],
                    "kernel": kernel_note(model) or "fp32 GEMMs",
                }
            )
            print(f"{label:<22} {rows[-1]['bytes'] / 1e6:7.3f} MB  ppl {metrics['ppl']:.4f}")
    return rows


def _eval_forward(model, batch):
    with torch.no_grad():
        model(input_ids=batch, use_cache=False)


def _decode(model, tokens: int):
    """Greedy decoding with the KV cache: one token a forward."""
    # transformers 5 renamed past_key_values to cache (argument and output field)
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([[ord("d"), ord("e"), ord("f"), ord(" ")]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(tokens):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, use_cache=True, **{cache: getattr(out, cache)})


EVAL_SHAPE = (16, 256)  # the batched-evaluation workload: sequences x tokens a forward


def eval_batch(source) -> torch.Tensor:
    """The first validation tokens as `EVAL_SHAPE`, or, where the split (a small --data corpus)
    or the model's positions hold fewer, as many sequences of as many tokens as they do: a note
    says which of them (the 16 x 256 slice was a RuntimeError after the whole quality pass). The
    split holds at least one window of the run's --seq-len + 1 tokens, so one sequence fits."""
    tokens = source.task.tokens("validation")
    rows, length = EVAL_SHAPE
    positions = max_positions(source.model)  # None: no limit (ALiBi)
    length = min(length, len(tokens), positions or length)
    rows = min(rows, len(tokens) // length)
    if (rows, length) != EVAL_SHAPE:
        why = []  # what limited it: the split (fewer rows; one, where it limits the length)
        if rows < EVAL_SHAPE[0]:
            why.append(f"the validation split holds {len(tokens):,} tokens")
        if length == positions < EVAL_SHAPE[1]:
            why.append(f"the model takes {positions} positions")
        print(
            f"note: {' and '.join(why)}: batched evaluation is timed on {rows} x {length} "
            f"tokens a forward, not {EVAL_SHAPE[0]} x {EVAL_SHAPE[1]}"
        )
    return tokens[: rows * length].reshape(rows, length).long()


def speed(source, args) -> dict:
    """tokens/s per int8 kernel and fp32, interleaved rounds; medians and ratios to fp32."""
    variants = {"fp32": build(source, None, None, None, None, None)}
    variants["int8 W8A8 (oneDNN qlinear)"] = build(
        source, None, "int8", "weights-and-activations", None, None
    )
    dequant = build(source, None, "int8", "weights-only", None, None)
    variants["int8 weight-only (dequant, fp32 GEMM)"] = dequant
    int8pack = build(source, None, "int8", "weights-only", None, None)
    set_kernel(int8pack, "int8pack")
    variants["int8 weight-only (_weight_int8pack_mm)"] = int8pack
    batch = eval_batch(source)
    decode_tokens = 32
    workloads = {
        f"eval {batch.shape[0]}x{batch.shape[1]}": (
            lambda m: _eval_forward(m, batch),
            batch.numel(),
        ),
        f"decode 1x{decode_tokens}": (lambda m: _decode(m, decode_tokens), decode_tokens),
    }
    times = {(w, v): [] for w in workloads for v in variants}
    for model in variants.values():
        model.eval()
        for run, _ in workloads.values():
            run(model)  # warm-up: caches, oneDNN primitives
    for _ in range(args.rounds):
        for w, (run, _) in workloads.items():
            for v, model in variants.items():
                start = time.perf_counter()
                run(model)
                times[(w, v)].append(time.perf_counter() - start)
    out = {}
    for w, (_, tokens) in workloads.items():
        base = statistics.median(times[(w, "fp32")])
        for v in variants:
            t = statistics.median(times[(w, v)])
            out[(w, v)] = (tokens / t, base / t)
            print(f"{w:<14} {v:<40} {tokens / t:10.0f} tok/s  {base / t:5.2f}x fp32")
    return out


NOISE_NOTE = (
    "The dequant row runs the very same fp32 GEMMs as fp32, so its distance from 1.00x is this "
    "(shared, busy) machine's noise. W8A8 runs oneDNN's quantized linear on a weight packed once "
    "(`torch.ops.onednn.qlinear_pointwise`), after one fused pass of per-token quantization; "
    "decoding one token at a time is dominated by per-op overhead. The layer table below shows "
    "the int8 GEMM per shape."
)
LAYER_SHAPES = [(4096, 128, 344), (4096, 344, 128), (4096, 1024, 1024), (4096, 2048, 5632)]


def layer_speed(args) -> list[tuple]:
    """One linear layer, M x K -> N: fp32 vs int8 W8A8 (quantize + int8 GEMM + rescale), same rounds."""
    from lowbit.infer import QuantLinear

    out = []
    for m, k, n in LAYER_SHAPES:
        gen = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(m, k, generator=gen)
        int8 = QuantLinear.from_linear(linear, QuantRecipe("int8", "weights-and-activations"))
        times = {"fp32": [], "int8": []}
        with torch.no_grad():
            linear(x), int8(x)
            for _ in range(args.rounds):
                for name, layer in (("fp32", linear), ("int8", int8)):
                    start = time.perf_counter()
                    layer(x)
                    times[name].append(time.perf_counter() - start)
        fp32, q = statistics.median(times["fp32"]), statistics.median(times["int8"])
        out.append(((m, k, n), fp32 * 1e3, q * 1e3, fp32 / q))
        print(f"layer {m}x{k}->{n}: fp32 {fp32 * 1e3:.2f} ms, int8 W8A8 {q * 1e3:.2f} ms")
    return out


def table(source, rows, speeds, args, layers=None) -> str:
    ref = rows[0]
    config = source.config
    data = "stdlib" if config.data is None else config.data
    # the batches `quality` evaluated, of the run's own batch size and length (every run's were
    # written "16 x 256", and --max-batches 0, every batch, "0 batches")
    batches = source.task.eval_batch_count("validation", args.max_batches)
    shape = f"{config.batch_size} x {config.seq_len}"
    # the run's own settings: every run was called "the default `lowbit train`", and the command
    # written was always `--write` without the --quick or --no-speed it ran with
    lines = [
        f"Run: `{args.run}` (`lowbit train` of model {config.model}, {config.recipe}, "
        f"{source.step} steps on {data} {config.tokenizer} tokens; settings in its config.yaml). "
        f"Validation: {ref['tokens']:,} tokens "
        f"({batches} batch{'es' if batches != 1 else ''} of {shape}). "
        "Sizes are the written `model.safetensors` "
        "(embeddings and norms stay fp32 in every row). Machine: "
        f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        f"Command: `{command_line()}`",
        "",
        "| model | size MB | vs fp32 | perplexity | change | how it runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        change = (r["ppl"] / ref["ppl"] - 1) * 100
        lines.append(
            f"| {r['label']} | {r['bytes'] / 1e6:.3f} | {ref['bytes'] / r['bytes']:.2f}x smaller "
            f"| {r['ppl']:.4f} | {change:+.2f}% | {r['kernel']} |"
        )
    if speeds:
        lines += [
            "",
            f"int8 speed on this CPU (medians of {args.rounds} interleaved rounds, same process):",
            "",
            "| workload | model | tokens/s | vs fp32 |",
            "|---|---|---:|---:|",
        ]
        for (w, v), (tps, ratio) in speeds.items():
            lines.append(f"| {w} | {v} | {tps:,.0f} | {ratio:.2f}x |")
        lines += [
            "",
            NOISE_NOTE,
        ]
    if layers:
        lines += [
            "",
            "One linear layer (M x K -> N), fp32 `nn.Linear` vs int8 W8A8 `QuantLinear` (per-token "
            "quantization + oneDNN int8 GEMM + rescale), same rounds:",
            "",
            "| M x K -> N | fp32 ms | int8 W8A8 ms | int8 vs fp32 |",
            "|---|---:|---:|---:|",
        ]
        for (m, k, n), fp32, q, ratio in layers:
            lines.append(f"| {m} x {k} -> {n} | {fp32:.2f} | {q:.2f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ScriptParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--run", required=True, help="a causal-lm run folder (lowbit train --out)")
    parser.add_argument(
        "--max-batches",
        type=int,
        default=8,
        help="validation batches; 0: every batch, as in lowbit eval",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    parser.add_argument("--quick", action="store_true", help="4 rows, no pruning")
    parser.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurement")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md's section")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    # before the quality pass: --rounds 0 was a StatisticsError after it, --threads 0 all threads
    at_least(parser, args, 1, "rounds", "threads")
    check_max_batches(args.max_batches)  # as lowbit eval: 0 is every batch, below 0 refused
    if args.threads:
        torch.set_num_threads(args.threads)
    if io.is_inference_dir(args.run):  # its "fp32 (reference)" row was the quantized model
        parser.error(
            f"{args.run} is a quantized/pruned folder, not a training run; fix: give the run it "
            f"was made from, --run {io.training_run(args.run)}"
        )
    source = io.load_source(args.run, "cpu")
    if source.config.task != "causal-lm":
        parser.error(
            f"{args.run} is {a_task_run(source.config.task)}, not a causal LM's; fix: give a "
            "causal-lm run folder (lowbit train --out)"
        )
    rows = quality(source, args)
    speeds = None if args.no_speed else speed(source, args)
    layers = None if args.no_speed else layer_speed(args)
    text = table(source, rows, speeds, args, layers)
    print(text)
    if args.write:
        write_section(HEADING, text)
    return 0


if __name__ == "__main__":
    run_script(main)
