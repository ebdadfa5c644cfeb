"""Multi-process workflows chained as users run them: interrupting, resuming, reading the
checkpoints of a distributed run. A launcher started with SIGINT ignored: test_errors (one run
with its SIGINT to the launcher alone)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from lowbit.errors import UsageError
from lowbit.train import TrainConfig, evaluate_run, train
from tests.distributed.helpers import DIGITS, TINY


def test_a_torn_shard_of_a_multi_process_checkpoint_is_a_one_line_error(tmp_path):
    """A torn ``.distcp`` shard (a full disk, a partial copy) failed in eval, generate, quantize
    and resume with DCP's traceback (an EOFError); a torn one-process checkpoint names the
    checkpoint to use instead."""
    out = tmp_path / "run"
    config = TrainConfig(steps=2, out=str(out), strategy="ddp", save_interval=1, **TINY)
    train(config, quiet=True)
    newest = out / "checkpoints" / "step-0000002.dcp"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    fix = r"step-0000002.dcp: unreadable checkpoint \(EOFError: __0_0.distcp holds 1000 of the "
    fix += r"\d+ bytes its .metadata lists\); fix: move it out of .*, so that "
    fix += "step-0000001.dcp is the newest"
    with pytest.raises(UsageError, match=fix):
        evaluate_run(out, max_batches=1)
    with pytest.raises(UsageError, match=fix):
        train(TrainConfig(steps=3, out=str(out), strategy="ddp", **TINY), resume=True, quiet=True)


def interrupt_every_rank(trainer):
    raise KeyboardInterrupt  # each rank, as a Ctrl-C that reaches it before it saves on one


def test_ranks_stopped_by_a_ctrl_c_before_they_save_are_an_interrupt(tmp_path, monkeypatch):
    """A Ctrl-C during the ranks' set-up stops them with KeyboardInterrupt, which torch's worker
    wrapper turns into exit code 0; the launcher then failed with a FileNotFoundError traceback
    (no result.pkl from rank 0) instead of the interrupt ``lowbit train`` reports."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = TrainConfig(steps=8, out=str(tmp_path / "run"), nproc=2, **DIGITS)
    with pytest.raises(KeyboardInterrupt):
        train(config, quiet=True, on_step=interrupt_every_rank)


def interrupt_this_process_once_two_ranks_start():
    deadline = time.monotonic() + 60
    while len(multiprocessing.active_children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the launcher waits on them; they import torch for seconds
    os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_while_the_ranks_start_is_an_interrupt(tmp_path, monkeypatch):
    """A Ctrl-C to the launcher while its ranks import (before they handle the stop request)
    killed them with that request's signal, reported as ``rank 1 died (signal SIGUSR1)``."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOWBIT_DIST_TIMEOUT", "60")
    config = TrainConfig(steps=8, out=str(tmp_path / "run"), nproc=2, **TINY)
    threading.Thread(target=interrupt_this_process_once_two_ranks_start, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        train(config, quiet=True)
