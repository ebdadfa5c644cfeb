"""Session 38: a Ctrl-C while the --jobs workers of `lowbit compare` and benchmarks/parity.py are
still starting: each worker imports the main module again (torch with it, seconds), where the
Ctrl-C printed its KeyboardInterrupt traceback (a `lowbit compare` worker, its own "lowbit:
interrupted" line, read as the study's last)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals"),
    pytest.mark.slow,  # fresh interpreters that import torch: seconds each on a busy machine
]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # generous: the machine's cores are shared
# the digits CNN for a study that trains: a stop is the same for every task, and its workers
# start without importing transformers (seconds of CPU each)
DIGITS = ["--task", "image-classification"]

# Imported by every interpreter started with its folder on PYTHONPATH: a spawned worker (its
# command line has --multiprocessing-fork) is held as it starts to import the main module again,
# in Python code, until the test lets it go on (the file "go"). It says it started (the file
# "started-PID") and that a SIGINT waits for it (is pending, "pending-PID"); a worker that the
# SIGINT interrupts there ends (the KeyboardInterrupt goes on). The test syncs on these events.
HOLD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    folder = os.environ.get("LOWBIT_TEST_HOLD_START")
    if folder and "--multiprocessing-fork" in sys.orig_argv:
        import multiprocessing.spawn as spawn

        prepare = spawn.prepare

        def held(data):
            Path(folder, f"started-{os.getpid()}").touch()
            deadline = time.monotonic() + 200
            while not Path(folder, "go").exists() and time.monotonic() < deadline:
                if signal.SIGINT in signal.sigpending():
                    Path(folder, f"pending-{os.getpid()}").touch()
                time.sleep(0.02)
            return prepare(data)

        spawn.prepare = held
    """
)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie its parent has not reaped yet, or reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (OSError, IndexError):
        return True


def _interrupted(argv: list[str], tmp_path: Path) -> tuple[int, list[str]]:
    """``argv`` started in a session of its own, and a Ctrl-C sent as its two workers start (to
    every process of the group, the workers first: the study's own process as a busy machine can
    schedule it, once the workers have met the signal); its exit status and stderr's lines."""
    hook, held = tmp_path / "hook", tmp_path / "held"
    hook.mkdir()
    held.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD)
    env = {**os.environ, "PYTHONPATH": str(hook), "LOWBIT_TEST_HOLD_START": str(held)}
    env["OMP_NUM_THREADS"] = "1"
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(workers := [int(p.name[8:]) for p in held.glob("started-*")]) < 2:
            assert process.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        while not all((held / f"pending-{pid}").exists() or _gone(pid) for pid in workers):
            assert time.monotonic() < deadline, "the workers neither held nor met the SIGINT"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        (held / "go").touch()
        code = process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return code, [line for line in err.read_text().splitlines() if line.strip()]


PARITY = [sys.executable, "benchmarks/parity.py", "--tasks", "image-classification"]
PARITY += ["--recipes", "fp32,bf16-mixed", "--seeds", "1", "--img-steps", "2", "--jobs", "2"]
PARITY += ["--device", "cpu", "--no-write", "--quiet"]


def test_parity_interrupted_while_its_workers_start_says_one_line(tmp_path):
    """Every worker is quiet: the one line is the study's, and the same command finishes."""
    argv = [*PARITY, "--out", str(tmp_path / "parity")]
    code, lines = _interrupted(argv, tmp_path)
    assert code == 130, lines
    assert len(lines) == 1 and lines[0].startswith("parity: interrupted; "), lines
    # the same command goes on (nothing half-written)
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "parity" / "image-classification" / "report" / "report.md").is_file()


def test_compare_interrupted_while_its_workers_start_ends_with_its_line(tmp_path):
    """`lowbit compare --jobs 2`: exit 130 and the study's line, once and last, no traceback."""
    argv = [sys.executable, "-m", "lowbit", "compare", "--recipes", "fp32,bf16-mixed"]
    argv += ["--seeds", "1", "--jobs", "2", "--threads", "1", "--steps", "2", "--seq-len", "16"]
    argv += ["--batch-size", "4", "--eval-batches", "1", "--quiet", "--no-plots"]
    argv += ["--out", str(tmp_path / "study")]
    code, lines = _interrupted(argv, tmp_path)
    assert code == 130, lines
    assert not [line for line in lines if "Traceback" in line], lines
    assert lines[-1].startswith("lowbit: interrupted"), lines
    assert sum(line.startswith("lowbit: interrupted") for line in lines) == 1, lines


def _ignoring_sigint() -> None:  # as a shell starts a script's background job (``... &``)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_a_kill_int_stops_compare_jobs_started_with_sigint_ignored(tmp_path):
    """``lowbit compare --jobs 2 ... &`` from a script: Python keeps the SIGINT ignored that it
    was started with, and a later ``kill -INT`` was lost: the study trained on to its end. It
    stops as a Ctrl-C does now: exit 130, each run in progress saved."""
    out = tmp_path / "study"
    argv = [sys.executable, "-m", "lowbit", "compare", "--recipes", "fp32,bf16-mixed"]
    argv += ["--seeds", "1", "--jobs", "2", "--threads", "1", "--steps", "100000", *DIGITS]
    argv += ["--batch-size", "4", "--quiet", "--no-plots", "--out", str(out)]
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            preexec_fn=_ignoring_sigint,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        metrics = out / "runs" / "fp32" / "seed-0" / "metrics.jsonl"
        # a step trained (its train row), so the run is in its training loop
        while not (metrics.is_file() and '"split": "train"' in metrics.read_text()):
            assert process.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # to the study's process alone, as `kill -INT $pid`
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the SIGINT was lost: the study trained on")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    lines = err.read_text().splitlines()
    assert code == 130, lines
    assert lines[-1].startswith("lowbit: interrupted; run the same command again"), lines
    assert any((out / "runs" / "fp32" / "seed-0" / "checkpoints").iterdir())
