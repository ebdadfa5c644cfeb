"""Stops of `lowbit compare` and of a program's studies by SIGTERM (review R9 of session 43)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOWBIT = str(Path(sys.executable).parent / "lowbit")


def test_a_sigterm_during_a_compare_runs_steps_is_named(tmp_path):
    """`lowbit compare` (one run at a time) stopped by a SIGTERM as its run trained said
    "lowbit: interrupted; ...", as for a Ctrl-C."""
    out = tmp_path / "study"
    command = [LOWBIT, "compare", "--task", "image-classification", "--recipes", "fp32"]
    command += ["--steps", "400", "--eval-interval", "1", "--no-plots", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        for line in process.stdout:  # the run's steps handle SIGTERM from its first step on
            if "step 1: validation loss" in line:
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    said = f"lowbit: terminated (SIGTERM); run the same command again to resume (out {out})\n"
    assert (process.returncode, stderr[-len(said) :]) == (130, said), stderr
    assert "Traceback" not in stderr
    (info,) = [json.loads(p.read_text(encoding="utf-8")) for p in out.glob("**/run.json")]
    assert info["status"] == "interrupted"


# A program that imports lowbit: a study stopped, or here only marked so, then a second study
# (no run to train) and a SIGTERM as the command's handler of a study would take it.
LATER_STUDY = """
import os, signal
from lowbit.errors import note_stopping
from lowbit.report.parallel import raise_interrupt, train_runs

note_stopping()  # as an earlier study's Ctrl-C did
train_runs([], 2, threads=1)  # nothing to train: the study ends at once
signal.signal(signal.SIGTERM, raise_interrupt)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    print("went on")
except KeyboardInterrupt as stop:
    print(type(stop).__name__)
"""


def test_a_later_study_of_a_program_stops_on_sigterm():
    """An earlier stop marked the process stopping for good: a SIGTERM to a later study was let
    pass, and it trained on."""
    done = subprocess.run(
        [sys.executable, "-c", LATER_STUDY], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert (done.returncode, done.stdout) == (0, "Terminated\n"), done.stderr


# A Ctrl-C as soon as `stops_held` has set SIGINT's handler back, before SIGTERM's.
CTRL_C_AS_HELD_ENDS = """
import os, signal
from lowbit import errors

signal.signal(signal.SIGTERM, errors.raise_terminated)
plain = signal.signal

def set_then_interrupt(signum, handler):
    previous = plain(signum, handler)
    if signum == signal.SIGINT and handler is signal.default_int_handler:
        os.kill(os.getpid(), signal.SIGINT)
    return previous

try:
    with errors.stops_held():
        signal.signal = set_then_interrupt
except KeyboardInterrupt:
    signal.signal = plain
    print(signal.getsignal(signal.SIGTERM) is errors.raise_terminated)
"""


def test_a_ctrl_c_as_held_stops_end_leaves_sigterms_handler_set_back():
    """SIGTERM's handler stayed `stops_held`'s own: a later SIGTERM was noted and lost."""
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_AS_HELD_ENDS],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert (done.returncode, done.stdout) == (0, "True\n"), done.stderr
