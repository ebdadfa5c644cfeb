"""A run killed without a word (SIGKILL, the out-of-memory killer) told from a live one by whatever
reads its folder later (session 36)."""

import contextlib
import fcntl
import json
import os
import subprocess
import sys

import pytest

from lowbit.cli import main

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@contextlib.contextmanager
def held(run):
    """``run``'s folder locked as a training process locks it."""
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


@pytest.fixture
def killed_run(tmp_path, capsys):
    """A 6-step run as a SIGKILL after its step-4 checkpoint leaves it: run.json still says
    "running" at step 4 (the step of its last checkpoint), a process that is gone, no step 6."""
    run = tmp_path / "run"
    argv = ["train", *NANO, "--steps", "6", "--eval-interval", "2", "--quiet", "--out", run]
    assert run_cli(capsys, *argv)[0] == 0
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    info.update(status="running", step=4, pid=gone.pid)
    del info["final_metrics"], info["final_metrics_step"]
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    (run / "checkpoints" / "step-0000006.pt").unlink()
    return run


def test_eval_of_a_killed_run_says_it_did_not_finish_and_how_to_resume(killed_run, capsys):
    """Its last checkpoint was evaluated without a word, as if it were the trained model."""
    code, out, err = run_cli(capsys, "eval", killed_run, "--max-batches", "1")
    assert code == 0
    assert "step-0000004.pt (step 4)" in out
    assert err.startswith(f"lowbit: warning: {killed_run}: the run did not finish: its process ")
    assert "died after saving step 4: run.json still says running, but no process holds" in err
    assert err.rstrip().endswith(
        f"using its latest checkpoint, step 4 of 6; resume with: lowbit train --resume {killed_run}"
    )
    # a checkpoint asked for by name is what the user chose: no note
    given = run_cli(capsys, "eval", killed_run, "--max-batches", "1", "--checkpoint", "4")
    assert given[0] == 0 and given[2] == ""


def test_eval_of_a_live_run_says_it_is_still_training(killed_run, capsys):
    """A process holding the folder's lock, as a training run does, is a live run, whatever its
    recorded pid."""
    with held(killed_run):
        code, _, err = run_cli(capsys, "eval", killed_run, "--max-batches", "1")
    assert code == 0
    assert err.startswith(f"lowbit: warning: {killed_run}: the run is still training (pid ")
    assert err.rstrip().endswith("; using its latest checkpoint, step 4 of 6")


def test_quantize_of_an_interrupted_run_says_it_did_not_finish(killed_run, capsys):
    """quantize takes the latest checkpoint as eval does (an interrupted run here)."""
    info = json.loads((killed_run / "run.json").read_text(encoding="utf-8"))
    info["status"] = "interrupted"
    (killed_run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    out = killed_run.parent / "int8"
    code, _, err = run_cli(capsys, "quantize", killed_run, "--to", "int8", "--out", out)
    assert code == 0
    assert (
        f"lowbit: warning: {killed_run}: the run did not finish (interrupted at step 4); using "
        f"its latest checkpoint, step 4 of 6; resume with: lowbit train --resume {killed_run}"
    ) in err


def test_resume_of_a_killed_run_says_it_died_and_from_which_step(killed_run, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", killed_run, "--quiet")
    assert code == 0
    assert err.startswith(f"lowbit: note: {killed_run}: its process (pid ")
    assert err.rstrip().endswith("; resuming from its checkpoint at step 4")
    info = json.loads((killed_run / "run.json").read_text(encoding="utf-8"))
    assert (info["status"], info["step"], info["pid"]) == ("completed", 6, os.getpid())
    # finished, its folder is read without a note
    assert run_cli(capsys, "eval", killed_run, "--max-batches", "1")[2] == ""


def test_eval_before_the_first_checkpoint_says_whether_to_wait_or_start_again(killed_run, capsys):
    """It said "wait for its first if it is still training, else start it again": which, it
    could tell."""
    for saved in (killed_run / "checkpoints").iterdir():
        saved.unlink()
    restart = f"lowbit train --config {killed_run / 'config.yaml'} --out {killed_run}"
    code, _, err = run_cli(capsys, "eval", killed_run)
    assert code == 2
    assert err.strip() == (
        f"lowbit: error: {killed_run}: the run stopped (killed) before it saved its first "
        f"checkpoint (it saves every 2 steps and at its end); fix: start it again ({restart})"
    )
    with held(killed_run):
        code, _, err = run_cli(capsys, "eval", killed_run)
    assert code == 2
    assert err.strip() == (
        f"lowbit: error: {killed_run}: the run is still training and has saved no checkpoint "
        "yet (it saves every 2 steps and at its end); fix: wait for its first"
    )


def test_a_record_killed_before_its_line_feed_is_not_joined_by_the_resumed_runs(killed_run, capsys):
    """A kill between a metrics record and its line feed: the resumed run appended its first
    record to that line, one line that no JSON reader reads (both records lost to it)."""
    metrics = killed_run / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 4]
    metrics.write_text("\n".join(kept), encoding="utf-8")  # no line feed after the last
    assert run_cli(capsys, "train", "--resume", killed_run, "--quiet")[0] == 0
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_run_recorded_on_another_machine_is_not_called_dead(killed_run, capsys):
    """Its lock may not be seen from here (some network file systems): say both."""
    info = json.loads((killed_run / "run.json").read_text(encoding="utf-8"))
    info["host"] = "another-machine"
    (killed_run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    code, _, err = run_cli(capsys, "eval", killed_run, "--max-batches", "1")
    assert code == 0
    assert err.startswith(
        f"lowbit: warning: {killed_run}: the run did not finish, or is still training on another "
        f"machine (run.json says running (pid {info['pid']} on host another-machine), and this "
        "machine cannot tell); using its latest checkpoint, step 4 of 6; if it is not running, "
        f"resume with: lowbit train --resume {killed_run}"
    )
