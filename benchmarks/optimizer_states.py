"""Validation loss of the tiny causal LM per optimizer-state precision, next to fp32 states.

    .venv/bin/python benchmarks/optimizer_states.py            # table
    .venv/bin/python benchmarks/optimizer_states.py --write    # also update BENCHMARKS.md

The default workload: the byte-level stdlib corpus (lowbit.data), the ``tiny`` Llama, recipe
``bf16-low`` (bf16 parameters, fp32 master weights) by default, AdamW (betas 0.9/0.95, weight
decay 0.1, lr 3e-3 with linear warm-up), gradient clipping at 1. Every run sees the same batches
from the same initialization; only the state precision changes. The claim checked: the final
validation loss is within 1% of fp32 states' (also the exit status). State bytes are measured on
the live optimizer (`lowbit.memory.measure`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks_md import write_section  # noqa: E402

from lowbit import Precision  # noqa: E402
from lowbit.data import LMBatches, build_tokenizer, load_corpus, tokenize_split  # noqa: E402
from lowbit.data.lm_dataset import eval_batches  # noqa: E402
from lowbit.memory import measure  # noqa: E402
from lowbit.models import build_causal_lm  # noqa: E402
from lowbit.optim import STATE_PRECISIONS, build_optimizer  # noqa: E402

HEADING = "## Optimizer-state precision (benchmarks/optimizer_states.py)"


def run(state: str, recipe: str, steps: int, batch: int, seq: int, train, val) -> dict:
    model = build_causal_lm("tiny", 257, seed=0)
    precision = Precision(recipe)
    model = precision.convert(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    optimizer = precision.wrap_optimizer(
        build_optimizer(groups, lr=3e-3, betas=(0.9, 0.95), state_precision=state)
    )
    batches = LMBatches(train, batch, seq, seed=0)
    warmup = max(steps // 10, 1)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / warmup)
        x, y = next(batches)
        with precision.autocast():
            loss = F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
        precision.backward(loss)
        precision.clip_grad_norm_(optimizer, 1.0)
        if step == steps - 1:
            states = measure(model, optimizer, precision).optimizer_states
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    total, count = 0.0, 0
    with torch.no_grad(), precision.autocast():
        for x, y in val:
            logits = model(x).logits.float()
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    num_params = sum(p.numel() for p in model.parameters())
    return {
        "state": state,
        "val_loss": total / count,
        "train_loss": loss.item(),
        "state_bytes": states,
        "bytes_per_param": states / num_params,
        "ms_per_step": 1000 * seconds / steps,
    }


def table(rows: list[dict], args) -> str:
    ref = next(r for r in rows if r["state"] == "fp32")["val_loss"]
    lines = [
        f"Command: `.venv/bin/python benchmarks/optimizer_states.py --steps {args.steps} "
        f"--batch {args.batch} --seq {args.seq} --recipe {args.recipe}` (tiny Llama, byte-level "
        "stdlib corpus, AdamW; same data and init for every row). State bytes are measured on the "
        "live optimizer and include the fp32 states that small tensors (< 4096 values: norms) keep.",
        "",
        "| state precision | val loss | vs fp32 | within 1% | state bytes | B/param | ms/step |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        rel = r["val_loss"] / ref - 1
        lines.append(
            f"| {r['state']} | {r['val_loss']:.4f} | {rel:+.2%} | {'yes' if abs(rel) <= 0.01 else 'NO'} "
            f"| {r['state_bytes']:,} | {r['bytes_per_param']:.2f} | {r['ms_per_step']:.0f} |"
        )
    lines.append("")
    lines.append(
        "ms/step is this shared CPU's and includes the model; the eager torchao quantization makes "
        "8-bit/4-bit steps slower on a CPU (on a GPU, `build_optimizer(..., compile=True)`)."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--recipe", default="bf16-low")
    parser.add_argument("--states", nargs="+", default=list(STATE_PRECISIONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md's section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    tokenizer = build_tokenizer("byte")
    train = tokenize_split(tokenizer, corpus.texts("train"))
    val = eval_batches(
        tokenize_split(tokenizer, corpus.texts("validation")), 16, args.seq, max_batches=8
    )
    states = ["fp32"] + [s for s in args.states if s != "fp32"]
    rows = []
    for state in states:
        rows.append(run(state, args.recipe, args.steps, args.batch, args.seq, train, val))
        print(rows[-1], flush=True)
    text = table(rows, args)
    print(text)
    if args.write:
        write_section(HEADING, text)
    ref = rows[0]["val_loss"]
    return 0 if all(abs(r["val_loss"] / ref - 1) <= 0.01 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
