"""Session 43: a SIGTERM to one rank of a ``--nproc`` run (``kill`` of that process, a scheduler
stopping one task) stopped every rank at the same step with a checkpoint, as it should, but rank 1
says nothing (rank 0 prints the stop messages) and rank 0 had no signal: the run ended
"(interrupted)" at step 3 of 50 without a word of why."""

from __future__ import annotations

import os
import signal

from tests.distributed.helpers import launch_in_a_process


def terminate_rank_1_at_step_3(trainer):
    if trainer.dist.rank == 1 and trainer.step_idx == 3:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_to_one_rank_saves_and_rank_0_says_why_the_run_stops(tmp_path):
    run = tmp_path / "run"
    done = launch_in_a_process(run, "terminate_rank_1_at_step_3", __name__, save_interval=100)
    assert done.stdout.split() == [
        "interrupted",
        "3",
        str(run / "checkpoints" / "step-0000003.dcp"),
    ]
    assert "another process of this run was asked to stop" in done.stderr, done.stderr
    assert "saving a checkpoint after step 3" in done.stderr, done.stderr
