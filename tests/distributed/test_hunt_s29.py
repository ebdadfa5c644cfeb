"""Session 29: what a user of ``--nproc`` sees when a rank is killed and with a MASTER_PORT that
is not a port. The session's launcher sent SIGTERM is checked by test_sigterm_s32 (the same run),
its FSDP2 token classifier by test_distributed_s30 (one run shared)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train
from tests.distributed.helpers import DIGITS, TINY

REPO = Path(__file__).resolve().parents[2]


def _launch(tmp_path, on_step: str) -> subprocess.CompletedProcess:
    """A 50-step two-rank run, its launcher a process of its own (whose resource tracker speaks
    as it exits), calling ``on_step`` of this module in the ranks; prints the result's status and
    checkpoint, or the `RankFailed` as the CLI does."""
    script = textwrap.dedent(
        f"""
        import sys

        from lowbit.distributed import RankFailed
        from lowbit.train import TrainConfig, train
        from tests.distributed.test_hunt_s29 import {on_step}

        config = TrainConfig(steps=50, out={str(tmp_path / "run")!r}, nproc=2, **{DIGITS!r})
        try:
            result = train(config, quiet=True, on_step={on_step})
        except RankFailed as error:
            print(f"lowbit: error: {{error}}", file=sys.stderr)
        else:
            print(result.status, result.steps, result.checkpoint)
        """
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LOWBIT_DIST_TIMEOUT": "60",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # two spawned ranks: about a minute on a busy machine
    )


def kill_rank_1(trainer):
    if trainer.dist.rank == 1 and trainer.step_idx == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, a scheduler: no handler runs


def test_a_killed_rank_is_one_line_without_a_leaked_semaphore_warning(tmp_path):
    """The launcher reported the killed rank in one line, then its resource tracker printed
    "There appear to be 2 leaked semaphore objects to clean up at shutdown" (tqdm's lock in the
    ranks, never unlinked by a killed rank). In some runs it named rank 0's gloo "Connection reset
    by peer" instead, or failed with "EOFError: Ran out of input" reading rank 0's error record
    while it was being written (those two were races: not every run without the fix shows them)."""
    done = _launch(tmp_path, "kill_rank_1")
    assert "rank 1 died (signal SIGKILL); the other ranks were stopped" in done.stderr
    assert "leaked semaphore" not in done.stderr, done.stderr


@pytest.mark.parametrize("value", ["abc", "70000"])
def test_a_master_port_that_is_not_a_port_is_a_one_line_error(tmp_path, monkeypatch, value):
    """The launcher failed with int()'s or the socket's traceback."""
    monkeypatch.setenv("MASTER_PORT", value)
    config = TrainConfig(steps=1, out=str(tmp_path / "run"), nproc=2, **TINY)
    with pytest.raises(UsageError, match=rf"MASTER_PORT={value} is not a port number .*; fix: "):
        train(config, quiet=True)
