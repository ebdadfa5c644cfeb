"""Session 31: a ``--nproc`` run stopped by a SIGTERM to its whole process group (Slurm's
preemption, ``timeout``, systemd's ``KillMode=control-group``, ``kill -TERM -- -PGID``), which
reaches the launcher and every rank at about the same time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.cli import main
from tests.distributed.helpers import on_ranks

REPO = Path(__file__).resolve().parents[2]
# far more steps than a run reaches before its signal: it stops on the signal, not at its end
STEPS = 10_000
# the first periodic checkpoint: once it exists every rank trains (its stop handler is set)
FIRST_SAVE = 2
TIMEOUT = 300  # generous: the machine's cores are shared


def _start(run: Path, *flags: str) -> tuple[subprocess.Popen, Path, Path]:
    """``lowbit train`` on two ranks in a process group of its own, as a scheduler's job is; its
    output goes to files (a pipe nobody reads could block it)."""
    argv = [sys.executable, "-m", "lowbit", "train", "--quiet", "--nproc", "2", *flags]
    out, err = run.with_suffix(".out"), run.with_suffix(".err")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWBIT_DIST_TIMEOUT": "120"}
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )
    return process, out, err


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # a run that ended already: nothing to stop
        os.killpg(process.pid, signum)


def _wait_until(done, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done():
        if (process.poll() is not None and not done()) or time.monotonic() > deadline:
            _signal_group(process, signal.SIGKILL)
            pytest.fail(f"no {what} (exit {process.returncode})")
        time.sleep(0.05)


def _finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        pytest.fail(f"the run did not end within {TIMEOUT} s (a hang)")


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _resume(rank, world, run, steps):
    """``lowbit train --resume RUN --steps STEPS`` in this rank; its exit status."""
    from lowbit.train import Trainer

    Trainer.sample = False  # no closing sample text: seconds, and no part of the check
    return main(["train", "--quiet", "--resume", run, "--steps", str(steps)])


def test_a_sigterm_to_the_whole_group_saves_one_checkpoint_and_resumes(tmp_path):
    """The ranks kept SIGTERM's default action, so a SIGTERM to the group killed them where they
    were: "lowbit: aborted", and the steps since the last periodic checkpoint were lost. Every
    rank now stops at the same step boundary, one whole checkpoint of that step is written, the
    launcher says how to resume, and the run resumes. The group's SIGTERM, repeated while the
    ranks save (a scheduler's second signal), lets the save finish, as in one process."""
    run = tmp_path / "run"
    flags = ["--device", "cpu", "--model", "nano", "--seq-len", "256", "--batch-size", "8"]
    flags += ["--eval-batches", "1", "--eval-interval", str(STEPS), "--steps", str(STEPS)]
    process, out, err = _start(run, *flags, "--save-interval", str(FIRST_SAVE), "--out", str(run))
    first = run / "checkpoints" / f"step-{FIRST_SAVE:07d}.dcp"
    _wait_until(first.exists, first.name, process)
    os.killpg(process.pid, signal.SIGTERM)
    # the ranks' steps are long enough for this second SIGTERM to come before they end
    _wait_until(lambda: "saving a checkpoint" in err.read_text(), "stop message", process)
    _signal_group(process, signal.SIGTERM)

    code, stderr = _finish(process), err.read_text()
    assert code == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert out.read_text().splitlines()[-1:] == [f"resume with: lowbit train --resume {run}"]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted", stderr
    stopped = info["step"]
    assert _checkpoints(run)[-1] == f"step-{stopped:07d}.dcp"
    assert not [name for name in _checkpoints(run) if name.startswith(".")]  # none half-written

    # resumed by two ranks as torchrun's, forked from the tests' server: two spawned ranks
    # spent seconds of CPU each importing torch, and what is checked is the checkpoint
    assert on_ranks(_resume, 2, group=False, run=str(run), steps=stopped + 1) == [0, 0]
    info = json.loads((run / "run.json").read_text())
    assert (info["status"], info["step"]) == ("completed", stopped + 1)
