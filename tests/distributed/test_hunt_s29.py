"""Session 29: what a user of ``--nproc`` sees when a rank is killed and with a MASTER_PORT that
is not a port. The session's launcher sent SIGTERM is checked by test_sigterm_s32 (the same run),
its FSDP2 token classifier by test_distributed_s30 (one run shared)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train
from tests.distributed.helpers import TINY, launch_in_a_process

REPO = Path(__file__).resolve().parents[2]


def kill_rank_1(trainer):
    if trainer.dist.rank == 1 and trainer.step_idx == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, a scheduler: no handler runs


def test_a_killed_rank_is_one_line_without_a_leaked_semaphore_warning(tmp_path):
    """The launcher reported the killed rank in one line, then its resource tracker printed
    "There appear to be 2 leaked semaphore objects to clean up at shutdown" (tqdm's lock in the
    ranks, never unlinked by a killed rank). In some runs it named rank 0's gloo "Connection reset
    by peer" instead, or failed with "EOFError: Ran out of input" reading rank 0's error record
    while it was being written (those two were races: not every run without the fix shows them)."""
    done = launch_in_a_process(tmp_path / "run", "kill_rank_1", __name__)
    assert "rank 1 died (signal SIGKILL); the other ranks were stopped" in done.stderr
    assert "leaked semaphore" not in done.stderr, done.stderr


@pytest.mark.parametrize("value", ["abc", "70000"])
def test_a_master_port_that_is_not_a_port_is_a_one_line_error(tmp_path, monkeypatch, value):
    """The launcher failed with int()'s or the socket's traceback."""
    monkeypatch.setenv("MASTER_PORT", value)
    config = TrainConfig(steps=1, out=str(tmp_path / "run"), nproc=2, **TINY)
    with pytest.raises(UsageError, match=rf"MASTER_PORT={value} is not a port number .*; fix: "):
        train(config, quiet=True)
