"""Estimate over measured activations, per recipe: what `lowbit estimate` counts for the backward
against what the model saves on this machine after one training step (as `lowbit train`'s memory
report measures it at step 2), for a named causal-LM size.

    python benchmarks/activation_ratios.py                          # nano, 8 x 128, every preset
    python benchmarks/activation_ratios.py --recipes fp8-tensorwise,fp8-delayed --batch 1 --seq 16

The figures are bytes, so they do not depend on the machine's load; docs/memory.md explains the
gaps (the CPU emulation keeps quantized values in bf16 carriers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lowbit
from lowbit.memory import measure_activations
from lowbit.memory.estimate import estimate
from lowbit.models import build_model, model_config
from lowbit.optim import build_optimizer
from lowbit.recipes import names
from lowbit.report.compare import parse_recipes


def ratios(size: str, recipe: str, batch: int, seq: int) -> tuple[int, int, int, int]:
    """(estimated activations, measured activations, estimated temporaries, measured ones) of
    ``recipe`` on ``size`` for ``batch x seq`` tokens, measured after one step (fp32 states)."""
    vocab = model_config(size).vocab_size
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe, device="cpu")
    model = precision.convert(build_model("causal-lm", size, vocab_size=vocab)).train()
    optimizer = precision.wrap_optimizer(build_optimizer(model.parameters(), lr=1e-3))
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def forward_and_loss():
        with precision.autocast():
            logits = model(inputs).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    precision.backward(forward_and_loss())
    precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    saved = measure_activations(model, forward_and_loss)
    planned = estimate(size, recipe, "fp32", batch, seq)
    return planned.activations, saved.activations, planned.temporaries, saved.temporaries


def main(argv=None) -> int:
    # here, not at the top: tests load this file as a module, without benchmarks/ on sys.path
    from benchmarks_md import DefaultsFormatter, ScriptParser, at_least

    parser = ScriptParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--size", default="nano", help="a named causal-LM size")
    parser.add_argument("--recipes", default=",".join(names()), help="default: every preset")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    args = parser.parse_args(argv)
    at_least(parser, args, 1, "batch", "seq")
    # before any is measured: an unknown name was a traceback after the recipes before it
    model_config(args.size)
    recipes = parse_recipes(args.recipes)
    print(f"{args.size}, {args.batch} x {args.seq}: estimate / measured activations (bytes)")
    for recipe in recipes:
        est, got, est_tmp, got_tmp = ratios(args.size, recipe, args.batch, args.seq)
        both = (est + est_tmp) / (got + got_tmp)
        print(
            f"{recipe:16s} {est:>12,} / {got:>12,} = {est / got:.2f}   with temporaries {both:.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    from benchmarks_md import run_script  # an unknown --size or --recipes: one line

    run_script(main)
