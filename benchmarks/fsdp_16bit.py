"""FSDP2 with 16-bit parameters: two gloo ranks against one process with the same global batch.

For each 16-bit-parameter recipe, 4 steps of the tiny causal LM (global batch 8 x 32 tokens,
constant lr) on two FSDP ranks and in one process; prints the largest relative loss gap over the
steps and whether both ranks end with the same (gathered) parameters. Prints a markdown table.

    .venv/bin/python benchmarks/fsdp_16bit.py [recipe ...]
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECIPES = ["bf16-low", "fp16-low", "bf16-pure", "bf16-pure-sr", "bf16-pure-kahan"]
STEPS = 4
TINY = dict(seq_len=32, batch_size=8, eval_batches=1, eval_interval=100, lr=3e-3, warmup_steps=0)


def config(out, recipe, **kw):
    from lowbit.train import TrainConfig

    return TrainConfig(recipe=recipe, steps=STEPS, out=out, min_lr=TINY["lr"], **TINY, **kw)


def parse_recipes(argv=None) -> list[str]:
    """The recipes named on the command line (RECIPES without any), checked here: an unknown one
    failed in both ranks as a spawn traceback (and so did --help)."""
    from benchmarks_md import ScriptParser

    import lowbit

    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "recipes", nargs="*", metavar="recipe", help=f"default: {' '.join(RECIPES)}"
    )
    recipes = parser.parse_args(argv).recipes
    unknown = [recipe for recipe in recipes if recipe not in lowbit.recipe_names()]
    if unknown:
        parser.error(
            f"unknown recipe(s) {', '.join(unknown)}; valid: {', '.join(lowbit.recipe_names())}"
        )
    return recipes or RECIPES


def _rank(rank, world, port, out, queue, recipes):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from lowbit.distributed import Ranks
    from lowbit.train import Trainer

    rows = {}
    for recipe in recipes:
        losses = []
        trainer = Trainer(
            config(f"{out}/{recipe}", recipe, strategy="fsdp", nproc=world),
            quiet=True,
            dist=Ranks("fsdp", torch.device("cpu")),
        )
        trainer.fit(on_step=lambda t, ls=losses: ls.append(t.recent_losses[-1]))
        params = torch.cat(
            [p.detach().full_tensor().float().reshape(-1) for p in trainer.model.parameters()]
        )
        rows[recipe] = (losses, hashlib.sha256(params.numpy().tobytes()).hexdigest())
    queue.put((rank, rows))
    dist.destroy_process_group()


def main():
    from lowbit.distributed.context import free_port
    from lowbit.train import train

    recipes = parse_recipes()
    torch.set_num_threads(1)
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, free_port(), out, queue, recipes), nprocs=2)
        ranks = dict(queue.get() for _ in range(2))
        print("| recipe | largest relative loss gap, 2 FSDP ranks vs 1 process | ranks equal |")
        print("|---|---:|---|")
        for recipe in recipes:
            one = []
            train(config(f"{out}/one-{recipe}", recipe), quiet=True,
                  on_step=lambda t, ls=one: ls.append(t.recent_losses[-1]))  # fmt: skip
            two, digest = ranks[0][recipe]
            gap = max(abs(a - b) / abs(b) for a, b in zip(two, one, strict=True))
            same = digest == ranks[1][recipe][1]
            print(f"| {recipe} | {gap:.1e} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
