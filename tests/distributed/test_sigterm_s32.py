"""Session 32: a SIGTERM to a run whose ranks lowbit's own launcher did not set up (torchrun's, or
one process with ``--strategy``) saves at a step boundary, and a SIGTERM is reported as one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# far more steps than a run reaches before its signal: it stops on the signal, not at its end
STEPS = 10_000
# the digits CNN: what is checked is the signal's path, the same for every task, and its ranks
# start without importing transformers (9 s of CPU less per two-rank run than the nano Llama's)
FLAGS = ["--quiet", "--device", "cpu", "--task", "image-classification", "--batch-size", "8"]
FLAGS += ["--eval-interval", str(STEPS), "--steps", str(STEPS)]
FLAGS += ["--save-interval", "1"]  # its first checkpoint: every rank trains, its handlers set
TIMEOUT = 180  # generous: the machine's cores are shared

# Imported by every interpreter started with its folder on PYTHONPATH (torchrun's ranks): a rank
# asked to stop is held at the step boundary where the ranks agree on the stop, in Python code
# (where a signal is handled) for up to a minute, until a second signal ends it. Without it the
# second Ctrl-C raced the ranks' last step and save: sent half a second after the stop message
# on a busy machine, it found them done and gone.
HOLD_THE_STOP = textwrap.dedent(
    """
    import os, time

    if os.environ.get("LOWBIT_TEST_HOLD_STOP"):
        from lowbit.distributed.context import Ranks

        agree = Ranks.any

        def held(self, flag):
            deadline = time.monotonic() + 60
            while flag and time.monotonic() < deadline:
                time.sleep(0.05)
            return agree(self, flag)

        Ranks.any = held
    """
)


def _start(run: Path, *flags: str, launcher=(), stdout=False) -> tuple[subprocess.Popen, Path]:
    """``lowbit train`` into ``run`` behind ``launcher`` (``python -m`` arguments), in a session
    of its own (a signal meant for it reaches nothing else); stderr goes to the file ``run``.err
    (a pipe nobody reads could block it), stdout to ``run``.out where ``stdout``."""
    argv = [sys.executable, "-m", *launcher, "lowbit", "train", *FLAGS, *flags, "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWBIT_DIST_TIMEOUT": "60"}
    env["PYTHONFAULTHANDLER"] = "1"  # a hung run's stacks, on the SIGABRT of a failed test
    err = run.with_suffix(".err")
    out = run.with_suffix(".out") if stdout else os.devnull
    with open(out, "w") as output, open(err, "w") as stderr:
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=output, stderr=stderr, start_new_session=True
        )
    return process, err


def _term_after_first_checkpoint(process: subprocess.Popen, run: Path) -> int:
    """SIGTERM to ``process`` alone once the run's first checkpoint exists; its exit code. A run
    that never gets there fails the test with its stderr (`_start`'s ``run``.err): what it said,
    or, still running, where it hung (the SIGABRT makes `faulthandler` print every thread's
    stack; a full test run once waited here 180 s for a run that said nothing)."""
    first = run / "checkpoints" / "step-0000001.dcp"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not first.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:
                    process.send_signal(signal.SIGABRT)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=10)
                stderr = run.with_suffix(".err").read_text()
                pytest.fail(f"no first checkpoint (exit {process.returncode}); stderr:\n{stderr}")
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of a failed run
            os.killpg(process.pid, signal.SIGKILL)


def _stopped_step(run: Path, stderr: str) -> int:
    """The step a run stopped at on its SIGTERM, checked to be resumable from its checkpoint."""
    assert "terminated (SIGTERM): saving a checkpoint after this step" in stderr, stderr
    assert "Ctrl-C" not in stderr, stderr
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted", stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-1] == f"step-{info['step']:07d}.dcp", names
    return info["step"]


def test_torchrun_ranks_save_on_the_sigterm_torchrun_sends_them(tmp_path):
    """torchrun, itself stopped (Slurm's preemption, ``scancel``), SIGTERMs its ranks, and SIGKILLs
    them after its shutdown timeout. The ranks kept SIGTERM's default action and died at once:
    run.json still said "running" and the steps since the last checkpoint were lost."""
    run = tmp_path / "run"
    process, err = _start(run, launcher=("torch.distributed.run", "--nproc-per-node", "2", "-m"))
    _term_after_first_checkpoint(process, run)  # torchrun's own exit: its SignalException
    assert _stopped_step(run, err.read_text()) >= 1


def test_one_process_with_a_strategy_saves_on_sigterm(tmp_path):
    """One process with ``--strategy`` runs as a group of one: it kept SIGTERM's default action,
    as a rank does, and died unsaved (exit 143) where one without a strategy saves."""
    run = tmp_path / "run"
    process, err = _start(run, "--strategy", "ddp")
    code = _term_after_first_checkpoint(process, run)
    assert code == 130, err.read_text()
    _stopped_step(run, err.read_text())


def test_a_sigterm_to_the_launcher_is_reported_as_a_sigterm(tmp_path):
    """A SIGTERM to the ``--nproc`` launcher reached the ranks as its Ctrl-C stop request: the run
    said "interrupted: ... (Ctrl-C again to abort)", which no one pressed, and a second Ctrl-C
    would not reach a launcher a scheduler is stopping. Session 29, the same run: SIGTERM ended
    the launcher at once (exit 143); its ranks, sent SIGINT by torch as their parent died,
    started to save, lost each other in the checkpoint's collectives and left a torn
    ``.step-*.dcp.tmp``: the steps since the last save were lost, where one process saves."""
    run = tmp_path / "run"
    process, err = _start(run, "--nproc", "2", stdout=True)
    code = _term_after_first_checkpoint(process, run)
    assert code == 130, err.read_text()
    step = _stopped_step(run, err.read_text())
    assert 1 <= step < STEPS
    # the launcher returned the run's result (no "lowbit: aborted"): its whole checkpoint, none torn
    stdout = run.with_suffix(".out").read_text().splitlines()
    assert stdout[-1:] == [f"resume with: lowbit train --resume {run}"], err.read_text()
    (checkpoint,) = [line.split()[-1] for line in stdout if line.startswith("  checkpoint ")]
    assert Path(checkpoint) == run / "checkpoints" / f"step-{step:07d}.dcp"
    assert Path(checkpoint).is_dir()
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_second_ctrl_c_to_torchrun_aborts_its_ranks(tmp_path, monkeypatch):
    """torchrun passes its first Ctrl-C on to its ranks as SIGINT (they save and stop) and the
    second as its shutdown's SIGTERM. Taken as one more stop request, that SIGTERM let the ranks
    finish their save where the stop message offers "Ctrl-C again to abort"; it aborts them, the
    last whole checkpoint kept."""
    run = tmp_path / "run"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_THE_STOP)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("LOWBIT_TEST_HOLD_STOP", "1")
    torchrun = ("torch.distributed.run", "--nproc-per-node", "2", "-m")
    process, err = _start(run, launcher=torchrun)
    first = run / "checkpoints" / "step-0000001.dcp"
    deadline, pressed = time.monotonic() + TIMEOUT, False
    try:
        while "saving a checkpoint" not in err.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"no stop message (exit {process.returncode}); stderr:\n{err.read_text()}"
                )
            if first.exists() and not pressed:
                process.send_signal(signal.SIGINT)  # the terminal's Ctrl-C: torchrun alone
                pressed = True
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=TIMEOUT)
        # torchrun, signalled again inside its shutdown, exits without waiting for its ranks: they
        # abort after it (a busy CI machine once had the group killed before they said so)
        while "lowbit: aborted" not in err.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    stderr = err.read_text()
    assert "lowbit: aborted; the last complete checkpoint" in stderr, stderr
    assert json.loads((run / "run.json").read_text())["status"] == "aborted", stderr
