"""Session 39: a `lowbit compare --jobs 2` worker killed outright (SIGKILL, the out-of-memory
killer) mid-run. The pool then ends its other workers and closes its end of the queue of runs;
the pool's "stop" to a worker it counted alive, written once that worker had ended too, went to a
pipe no process read, and the study died of SIGPIPE (the command's default action) without a
line. It ends with one line now, naming the run whose worker died and how to go on."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGPIPE"), reason="POSIX signals"),
    pytest.mark.slow,  # three fresh interpreters, two of which import torch: seconds each
]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # generous: the machine's cores are shared

# Imported by every interpreter started with its folder on PYTHONPATH. A --jobs worker (its
# command line has --multiprocessing-fork) that starts second is held as it starts, and ends half
# a second after a SIGTERM (the pool's, once the other worker died), so the broken pool counts it
# alive as it sends its workers their "stop". In the study's own process (``-m lowbit``) the
# broken pool counts its workers alive, then waits until they have ended before it writes those
# stops: what a busy machine does by chance (the writes come from another thread), every time.
HOOK = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    folder = os.environ.get("LOWBIT_TEST_POOL")

    def gone(pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        return stat.rsplit(")", 1)[1].split()[0] in "ZX"

    if folder and "--multiprocessing-fork" in sys.orig_argv:
        try:
            os.close(os.open(os.path.join(folder, "first"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            def end(signum, frame):
                time.sleep(0.5)
                os._exit(0)

            signal.signal(signal.SIGTERM, end)
            while True:
                time.sleep(0.05)
    elif folder and sys.orig_argv[1:3] == ["-m", "lowbit"]:
        from concurrent.futures import process

        manager = process._ExecutorManagerThread
        broken, shutdown = manager.terminate_broken, manager.shutdown_workers

        def terminate_broken(self, cause):
            self.broken = True
            return broken(self, cause)

        def shutdown_workers(self):
            if getattr(self, "broken", False):
                alive = self.get_n_children_alive()
                deadline = time.monotonic() + 60
                while not all(gone(p.pid) for p in self.processes.values()):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                self.get_n_children_alive = lambda: alive
            return shutdown(self)

        manager.terminate_broken = terminate_broken
        manager.shutdown_workers = shutdown_workers
    """
)


def _study(tmp_path, env: dict):
    """`lowbit compare --jobs 2` of two digits runs (fp32, bf16-mixed) long enough to be killed
    mid-run, started in a session of its own: its process, the runs' folders and its stderr."""
    out, err = tmp_path / "study", tmp_path / "stderr"
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "lowbit", "compare", "--recipes", "fp32,bf16-mixed"]
    argv += ["--seeds", "1", "--jobs", "2", "--threads", "1", "--steps", "100000"]
    # the digits CNN: a worker starts without importing transformers (seconds of CPU)
    argv += ["--task", "image-classification", "--batch-size", "4"]
    argv += ["--quiet", "--no-plots", "--out", str(out)]
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    return process, [out / "runs" / recipe / "seed-0" for recipe in ("fp32", "bf16-mixed")], err


def _kill_when_training(process, runs, err, count: int) -> tuple[list[Path], int, list[str]]:
    """SIGKILL the workers of the first ``count`` of ``runs`` to train a step (its train row: the
    run is in its training loop, its run.json written), at once: the runs killed, the study's
    exit status and its stderr's lines (the study is killed if it does not end)."""
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            training = [
                run
                for run in runs
                if (run / "metrics.jsonl").is_file()
                and '"split": "train"' in (run / "metrics.jsonl").read_text()
            ]
            if len(training) >= count:
                break
            assert process.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the runs did not start training"
            time.sleep(0.05)
        pids = [json.loads((run / "run.json").read_text())["pid"] for run in training[:count]]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        code = process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    lines = [line for line in err.read_text().splitlines() if line.strip()]
    assert not [line for line in lines if "Traceback" in line], lines
    return training[:count], code, lines


def test_a_worker_killed_mid_run_ends_compare_with_one_line_naming_its_run(tmp_path):
    """Exit 2 and one last line: the run whose worker died, and the same command to go on."""
    hook, events = tmp_path / "hook", tmp_path / "events"
    hook.mkdir()
    events.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {"PYTHONPATH": str(hook), "LOWBIT_TEST_POOL": str(events)}
    (run,), code, lines = _kill_when_training(*_study(tmp_path, env), 1)
    assert code == 2, (code, lines)  # -13: SIGPIPE
    recipe = run.parent.name
    assert lines[-1].startswith(
        f"lowbit: error: a worker process died while training study: {recipe} seed 0, one of 2 "
        "runs at a time (killed by the system: out of memory?)"
    ), lines
    assert lines[-1].endswith("then run the same command again to resume"), lines
    assert "; the other runs stopped, every run keeps its last checkpoint" in lines[-1], lines
    assert (run / "run.json").is_file() and (run / "metrics.jsonl").is_file()  # nothing cleared


def test_two_workers_killed_are_both_named_in_one_line(tmp_path):
    """Both runs' workers killed at once: "A and B, one of 2 runs at a time" said one of them."""
    _, code, lines = _kill_when_training(*_study(tmp_path, {}), 2)
    assert code == 2, (code, lines)
    assert lines[-1].startswith(
        "lowbit: error: worker processes died while training study: fp32 seed 0 and study: "
        "bf16-mixed seed 0, two of 2 runs at a time (killed by the system: out of memory?); "
        "every run keeps its last checkpoint"  # no other run stopped: every worker died
    ), lines


# The second --jobs worker to start stops in its run's set-up, its run.json written ("running",
# its pid) but its trainer not yet handling SIGTERM as a stop: the broken pool's SIGTERM kills it
# there, as it does a worker still setting up, and its run.json reads as a killed run's.
SETTING_UP = textwrap.dedent(
    """
    import os, signal, sys

    folder = os.environ.get("LOWBIT_TEST_POOL")
    if folder and "--multiprocessing-fork" in sys.orig_argv:
        try:
            os.close(os.open(os.path.join(folder, "first"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            from lowbit.train.trainer import Trainer

            written = Trainer._write_run_info

            def write_and_wait(self, *args):
                written(self, *args)
                while True:
                    signal.pause()

            Trainer._write_run_info = write_and_wait
    """
)


def test_a_worker_the_pool_ends_as_it_sets_up_is_not_named_killed(tmp_path):
    """Only the worker the system killed (SIGKILL) is named: the other, ended by the pool's
    SIGTERM before it could save, left run.json "running" too, and the line named both runs."""
    hook, events = tmp_path / "hook", tmp_path / "events"
    hook.mkdir()
    events.mkdir()
    (hook / "sitecustomize.py").write_text(SETTING_UP)
    env = {"PYTHONPATH": str(hook), "LOWBIT_TEST_POOL": str(events)}
    process, runs, err = _study(tmp_path, env)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not all((run / "run.json").is_file() for run in runs):  # both runs set up
            assert process.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    (run,), code, lines = _kill_when_training(process, runs, err, 1)
    assert code == 2, (code, lines)
    assert lines[-1].startswith(
        f"lowbit: error: a worker process died while training study: {run.parent.name} seed 0, "
        "one of 2 runs at a time (killed by the system: out of memory?); the other runs stopped"
    ), lines
