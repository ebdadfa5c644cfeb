"""`lowbit estimate`: training memory per device, by component, and which accelerators it fits."""

from __future__ import annotations

import argparse

from lowbit.memory.breakdown import human
from lowbit.memory.estimate import ACCELERATORS_GIB, RESERVE, SHARDING, estimate, fits
from lowbit.models import list_sizes
from lowbit.optim import STATE_PRECISIONS
from lowbit.recipes import names as recipe_names

NAME = "estimate"
HELP = "Estimate training memory (parameters, gradients, master weights, states, activations)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help=f"a size ({', '.join(list_sizes())}), or the config.json (or checkpoint folder) of "
        "any causal LM transformers builds",
    )
    parser.add_argument("--recipe", default="bf16-mixed", help=", ".join(recipe_names()))
    parser.add_argument(
        "--optimizer-state",
        default="fp32",
        help=f"Adam state precision: {', '.join(STATE_PRECISIONS)}",
    )
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per device")
    parser.add_argument("--seq", type=int, default=1024, help="sequence length")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--sharding", default="none", help=" or ".join(SHARDING))
    parser.add_argument("--activation-checkpointing", action="store_true")


def run(args) -> int:
    kw = dict(gpus=args.gpus, sharding=args.sharding)
    without = estimate(args.model, args.recipe, args.optimizer_state, args.batch, args.seq, **kw)
    with_ckpt = estimate(
        args.model,
        args.recipe,
        args.optimizer_state,
        args.batch,
        args.seq,
        **kw,
        activation_checkpointing=True,
    )
    chosen = with_ckpt if args.activation_checkpointing else without
    print(
        f"model {args.model}: {chosen.num_params:,} parameters; recipe {args.recipe}; "
        f"{args.optimizer_state} optimizer states; batch {args.batch} x seq {args.seq}; "
        f"{args.gpus} GPU(s), sharding {args.sharding}"
        + ("; activation checkpointing" if args.activation_checkpointing else "")
    )
    print(chosen.table(titles=("bytes/device", "")))
    print(
        f"activations without checkpointing {without.activations:,} ({human(without.activations)}), "
        f"with {with_ckpt.activations:,} ({human(with_ckpt.activations)})"
    )
    print(f"\nfits ({RESERVE:.0%} of each device reserved for context and fragmentation):")
    for gib in ACCELERATORS_GIB:
        capacity = gib * 2**30 * (1 - RESERVE)
        largest = fits(
            args.model,
            args.recipe,
            args.optimizer_state,
            args.seq,
            capacity,
            **kw,
            activation_checkpointing=args.activation_checkpointing,
        )
        verdict = "yes" if chosen.total <= capacity else "no"
        print(f"  {gib:>4} GB  {verdict:<4} largest batch {largest}")
    return 0
