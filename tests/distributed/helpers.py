"""Running a function on N gloo ranks (one torch thread each) with a deadline.

The ranks are forked from a server process that imported torch and lowbit once (multiprocessing's
"forkserver", started by the first call in each pytest process): a spawned rank spent about 5 s
of CPU importing them, on every call. A forked rank starts as a spawned one did: the server only
imported modules (none of the caller's state reaches a rank), and each rank takes the caller's
environment and working folder of the call and generators seeded afresh.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy
import pytest
import torch

from lowbit.distributed.context import free_port

TINY = {"seq_len": 32, "batch_size": 8, "eval_batches": 1, "eval_interval": 100, "lr": 3e-3}
# the digits CNN, for runs whose check is the same for every task (a launcher's signals, a rank's
# failure): its ranks start without importing transformers, seconds of CPU each
DIGITS = {"task": "image-classification", "batch_size": 8, "eval_interval": 100, "lr": 3e-3}
# what every rank imports; a test module (the ``fn``'s) is imported by each rank, quickly then.
# The rest: what a `Trainer` imports as it first runs (its data, model, evaluation, memory
# plan and TensorBoard log): 2.5 s of CPU in each rank that trained, 0.3 s once preloaded here
_PRELOAD = ["torch.distributed.fsdp", "lowbit.train", "lowbit.distributed"]
_PRELOAD += [
    "lowbit.data.lm_dataset",
    "transformers.models.llama.modeling_llama",
    "lowbit.infer.evaluate",
    "lowbit.memory.estimate",
    "torch.utils.tensorboard",
    "torchao.quantization",
]


def _entry(rank, fn, nproc, port, folder, kwargs, group, environ):
    os.environ.clear()  # the server's, as the first call found it: the caller's now instead
    os.environ.update(environ)
    # a fresh process's generators (seeded from the system's entropy): forked, every rank had
    # the server's, and unseeded draws were the same on every rank and in every call
    torch.seed()
    numpy.random.seed()
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        LOWBIT_DIST_TIMEOUT="120",
    )  # fmt: skip
    torch.set_num_threads(1)
    if not group:  # fn joins and leaves the process group itself
        out = fn(rank, nproc, **kwargs)
        (Path(folder) / f"rank-{rank}.pkl").write_bytes(pickle.dumps(out))
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        out = fn(rank, nproc, **kwargs)
        # every rank done with its collectives before any leaves the group: a rank that destroyed
        # it while another was still in the last one (``full_tensor``'s all-gather) aborted that
        # rank ("terminate called without an active exception", about one run in six)
        dist.barrier()
    finally:
        from lowbit.nn.operand import set_scale_agreement

        set_scale_agreement(None)
        dist.destroy_process_group()
    (Path(folder) / f"rank-{rank}.pkl").write_bytes(pickle.dumps(out))


def on_ranks(fn, nproc: int = 2, timeout: float = 240, group: bool = True, **kwargs) -> list:
    """``fn(rank, world_size, **kwargs)`` on each rank (a module-level function); their results.
    ``group=False``: the ranks get the environment of one job, and ``fn`` joins its process group.

    A rank that raises or a run past ``timeout`` seconds fails the test (the others are stopped).
    """
    import torch.multiprocessing as mp

    multiprocessing.forkserver.set_forkserver_preload(_PRELOAD)  # once the server runs: no-op
    with tempfile.TemporaryDirectory() as folder:
        args = (fn, nproc, free_port(), folder, kwargs, group, dict(os.environ))
        context = mp.start_processes(
            _entry, args=args, nprocs=nproc, join=False, start_method="forkserver"
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    pytest.fail(f"ranks still running after {timeout} s (a hang)")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [pickle.loads((Path(folder) / f"rank-{r}.pkl").read_bytes()) for r in range(nproc)]


def launch_in_a_process(out: Path, on_step: str, module: str, **settings):
    """A 50-step two-rank digits run (`DIGITS` and ``settings``) into ``out``, its launcher a
    process of its own, calling ``on_step`` of the test ``module`` in the ranks; prints the
    result's status, steps and checkpoint, or the `RankFailed` as the CLI does."""
    repo = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(
        f"""
        import sys

        from lowbit.distributed import RankFailed
        from lowbit.train import TrainConfig, train
        from {module} import {on_step}

        settings = {{**{DIGITS!r}, **{settings!r}}}
        config = TrainConfig(steps=50, out={str(out)!r}, nproc=2, **settings)
        try:
            result = train(config, quiet=True, on_step={on_step})
        except RankFailed as error:
            print(f"lowbit: error: {{error}}", file=sys.stderr)
        else:
            print(result.status, result.steps, result.checkpoint)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWBIT_DIST_TIMEOUT": "60"}
    env["PYTHONPATH"] = str(repo)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # two spawned ranks: about a minute on a busy machine
    )
