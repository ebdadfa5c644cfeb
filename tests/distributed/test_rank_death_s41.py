"""Session 41: a rank of a ``--nproc`` run killed outright (the out-of-memory killer) or failing
was reported as ``rank 1 died (signal SIGKILL); the other ranks were stopped`` and nothing more:
the user had to find out what the run kept and how to go on from it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from tests.distributed.helpers import DIGITS, launch_in_a_process

REPO = Path(__file__).resolve().parents[2]


def kill_rank_1_at_step_3(trainer):
    if trainer.dist.rank == 1 and trainer.step_idx == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer: no handler runs


def fail_rank_1_at_step_1(trainer):
    if trainer.dist.rank == 1 and trainer.step_idx == 1:
        raise RuntimeError("a bug in rank 1")


def test_a_killed_rank_names_the_checkpoint_kept_and_the_resume_command(tmp_path):
    run = tmp_path / "run"
    done = launch_in_a_process(run, "kill_rank_1_at_step_3", __name__, save_interval=2)
    expected = (
        "rank 1 died (signal SIGKILL); the other ranks were stopped; the last complete "
        f"checkpoint {run / 'checkpoints' / 'step-0000002.dcp'} is intact; resume with: lowbit "
        f"train --resume {shlex.quote(str(run))}"
    )
    assert expected in done.stderr, done.stderr


def test_a_failed_rank_before_any_checkpoint_says_nothing_was_kept(tmp_path):
    done = launch_in_a_process(tmp_path / "run", "fail_rank_1_at_step_1", __name__, save_interval=2)
    expected = (
        "rank 1 failed: RuntimeError: a bug in rank 1; the other ranks were stopped; no "
        "checkpoint was written, nothing to resume"
    )
    assert expected in done.stderr, done.stderr


_FAIL_IN_SET_UP = """
import sys

import torch.distributed as dist

import lowbit.train.trainer as trainer_module
from lowbit.distributed import RankFailed
from lowbit.train import TrainConfig, train

real_init = trainer_module.Trainer.__init__


def init(self, config, *args, **kwargs):
    if dist.is_initialized() and dist.get_rank() == 1:  # before rank 0 clears the folder
        raise MemoryError("rank 1 out of memory in its set-up")
    real_init(self, config, *args, **kwargs)


trainer_module.Trainer.__init__ = init

if __name__ == "__main__":
    config = TrainConfig(steps=2, out=sys.argv[1], nproc=2, **{settings!r})
    try:
        train(config, quiet=True, overwrite=True)
    except RankFailed as error:
        print(f"lowbit: error: {{error}}", file=sys.stderr)
"""


def test_a_failed_overwrite_run_does_not_offer_the_old_runs_checkpoint(tmp_path):
    """Review R4: an --overwrite run whose rank failed before rank 0 cleared the folder named
    the run it replaces' checkpoint, and a resume command that continued that old run."""
    from lowbit.train import TrainConfig, train

    run = tmp_path / "run"
    settings = {**DIGITS, "save_interval": 1}
    train(TrainConfig(steps=1, out=str(run), **settings), quiet=True)  # the run replaced
    script = tmp_path / "fail_in_set_up.py"
    script.write_text(_FAIL_IN_SET_UP.format(settings=settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWBIT_DIST_TIMEOUT": "60"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(script), str(run)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "rank 1 out of memory in its set-up" in done.stderr, done.stderr
    assert "this run wrote no checkpoint of its own, nothing of it to resume" in done.stderr, (
        done.stderr
    )
