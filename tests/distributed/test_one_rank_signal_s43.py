"""Session 43: a SIGTERM to one rank of a ``--nproc`` run (``kill`` of that process, a scheduler
stopping one task) stopped every rank at the same step with a checkpoint, as it should, but rank 1
says nothing (rank 0 prints the stop messages) and rank 0 had no signal: the run ended
"(interrupted)" at step 3 of 50 without a word of why."""

from __future__ import annotations

import os
import signal
import threading

from tests.distributed.helpers import launch_in_a_process


def terminate_rank_1_at_step_3(trainer):
    if trainer.dist.rank == 1 and trainer.step_idx == 3:
        os.kill(os.getpid(), signal.SIGTERM)


def terminate_both_ranks_at_step_3_rank_0_later(trainer):
    """A SIGTERM to every rank, rank 0's a moment after rank 1's (a job's nodes, signalled)."""
    if trainer.step_idx == 3:
        if trainer.dist.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()


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


def test_a_group_sigterm_reaching_rank_0_later_says_one_stop_line(tmp_path):
    """Rank 0 agreed to stop at rank 1's signal and said so, then its own came: it said both,
    "another process ... (a signal to it alone)" and "terminated (SIGTERM)", which contradict."""
    run = tmp_path / "run"
    done = launch_in_a_process(
        run, "terminate_both_ranks_at_step_3_rank_0_later", __name__, save_interval=100
    )
    assert done.stdout.split()[:2] == ["interrupted", "3"], done
    assert done.stderr.count("saving a checkpoint") == 1, done.stderr
