"""Bytes each rank hands to collectives per training step, per parameter, for DDP and FSDP2.

Two gloo ranks on the CPU train the tiny causal LM for a few steps; DDP's gradient all-reduce is
counted by lowbit's comm hook, FSDP2's all-gathers and reduce-scatters by wrapping
``torch.distributed.all_gather_single`` / ``reduce_scatter_single`` (what FSDP2 calls), and the
scale agreement's amax all-reduces by its call and byte counters. Prints a markdown table.

    .venv/bin/python benchmarks/distributed_comm.py [strategy:recipe ...]   # e.g. fsdp:bf16-low
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = [
    ("ddp", "fp32"), ("ddp", "bf16-mixed"), ("ddp", "bf16-low"), ("ddp", "fp8-tensorwise"),
    ("ddp", "fp8-rowwise"), ("ddp", "mxfp8"), ("ddp", "nvfp4"), ("fsdp", "fp32"),
    ("fsdp", "bf16-mixed"), ("fsdp", "bf16-low"), ("fsdp", "bf16-pure-sr"),
    ("fsdp", "fp8-tensorwise"), ("fsdp", "mxfp8"),
]  # fmt: skip
STEPS = 2


def parse_runs(argv=None) -> list[tuple[str, str]]:
    """The runs named on the command line (all of RUNS without any), each checked here: a bad one
    failed in both ranks as a spawn traceback (and so did --help)."""
    from benchmarks_md import ScriptParser

    import lowbit

    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="*", metavar="strategy:recipe", help="only these runs, e.g. fsdp:bf16-low"
    )
    runs = []
    for run in parser.parse_args(argv).runs:
        strategy, _, recipe = run.partition(":")
        if strategy not in ("ddp", "fsdp") or recipe not in lowbit.recipe_names():
            parser.error(
                f"{run!r} is not strategy:recipe; fix: ddp or fsdp, a colon and one of "
                f"{', '.join(lowbit.recipe_names())}, e.g. fsdp:bf16-low"
            )
        runs.append((strategy, recipe))
    return runs or RUNS


def _rank(rank, world, port, out, queue, runs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    counts = {"all_gather": 0, "reduce_scatter": 0}
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def all_gather_single(output, input, *a, **k):
        counts["all_gather"] += output.numel() * output.element_size()
        return gather(output, input, *a, **k)

    def reduce_scatter_single(output, input, *a, **k):
        counts["reduce_scatter"] += input.numel() * input.element_size()
        return scatter(output, input, *a, **k)

    dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single
    from lowbit.distributed import Ranks
    from lowbit.train import TrainConfig, Trainer

    rows = []
    for strategy, recipe in runs:
        ranks = Ranks(strategy, torch.device("cpu"))
        config = TrainConfig(recipe=recipe, steps=STEPS, seq_len=32, batch_size=8,
                             out=f"{out}/{strategy}-{recipe}", strategy=strategy, nproc=world)  # fmt: skip
        trainer = Trainer(config, quiet=True, dist=ranks)
        params = sum(p.numel() for p in trainer.model.parameters())
        trainer.step()  # warm-up (FSDP's first all-gather sizes its buffers the same way)
        for key in counts:
            counts[key] = 0
        comm0 = ranks.comm.bytes if ranks.comm else 0
        calls0, amax_bytes0 = ranks.agreement.calls, ranks.agreement.bytes
        for _ in range(STEPS):
            trainer.step()
        ddp = ((ranks.comm.bytes if ranks.comm else 0) - comm0) / STEPS
        gathered = counts["all_gather"] / STEPS
        scattered = counts["reduce_scatter"] / STEPS
        amax = (ranks.agreement.calls - calls0) / STEPS
        amax_bytes = (ranks.agreement.bytes - amax_bytes0) / STEPS
        rows.append((strategy, recipe, params, ddp, gathered, scattered, amax, amax_bytes))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main():
    from lowbit.distributed.context import free_port

    runs = parse_runs()
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, free_port(), out, queue, runs), nprocs=2)
        rows = queue.get()
    print("| strategy | recipe | parameters | all-reduce B/param | all-gather B/param | "
          "reduce-scatter B/param | amax all-reduces/step | amax B/step |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for strategy, recipe, params, ddp, gathered, scattered, amax, amax_bytes in rows:
        print(f"| {strategy} | {recipe} | {params:,} | {ddp / params:.2f} | {gathered / params:.2f} "
              f"| {scattered / params:.2f} | {amax:.0f} | {amax_bytes:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
