"""A usage error of a multi-process run is printed once, not once per rank."""

import json
import os
import subprocess
import sys

from lowbit.cli import main
from lowbit.distributed.context import free_port

UNKNOWN_RECIPE = ["train", "--recipe", "no-such-recipe", "--steps", "1"]


def _torchrun_rank(monkeypatch, tmp_path, rank: int):
    """The environment torchrun gives a rank, its error file under ``tmp_path``."""
    error_file = tmp_path / f"error-{rank}.json"
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    return error_file


def test_under_torchrun_rank_0_prints_and_the_others_tell_torchrun(monkeypatch, tmp_path, capsys):
    """Every rank fails (status 2); only rank 0 prints the line. Another rank hands it to
    torchrun's failure summary (its error file), so an error of its own is not lost."""
    error_file = _torchrun_rank(monkeypatch, tmp_path, 0)
    assert main(UNKNOWN_RECIPE) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: unknown recipe")
    assert not error_file.exists()

    error_file = _torchrun_rank(monkeypatch, tmp_path, 1)
    assert main(UNKNOWN_RECIPE) == 2
    assert capsys.readouterr().err == ""
    assert json.loads(error_file.read_text())["message"] == lines[0]


def test_nproc_prints_a_ranks_usage_error_once(tmp_path):
    """The ranks fail on the data; the launcher prints the error, and nothing else (torch's
    "Terminating process N via signal SIGTERM" warning came with it). The data's warning is said
    once too, by rank 0 (the launcher reads the data before the ranks start, silently). The
    error is one only the ranks can meet: too few tokens for a window needs the run's tokenizer,
    which the launcher does not build (a missing --data it refuses itself: test_preflight_s35)."""
    data = tmp_path / "short.txt"  # 20 copies of a paragraph: shared by the splits, 644 tokens
    data.write_text("\n\n".join(["the same paragraph, again and again."] * 20))
    argv = ["train", "--nproc", "2", "--device", "cpu", "--model", "nano", "--steps", "1"]
    argv += ["--data", str(data), "--seq-len", "1000", "--out", str(tmp_path / "run")]
    done = subprocess.run(
        [sys.executable, "-m", "lowbit", *argv],
        capture_output=True,
        text=True,
        timeout=300,  # two spawned ranks: about a minute on a busy machine
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2
    warning, error = done.stderr.splitlines()
    assert warning.startswith(f"lowbit: warning: {data}: 2 of 2 validation and 1 of 1 test")
    assert error == (
        f"lowbit: error: {data}: the train split holds 644 tokens, fewer than one window of "
        "--seq-len + 1 = 1001; fix: use more data or a shorter --seq-len"
    )


def test_a_non_finite_loss_under_torchrun_is_printed_once(tmp_path):
    """Every rank stops at the same non-finite step (the loss and gradient norm are the ranks'
    mean); each printed the error, so the user read it once per rank (session 27). The digits
    CNN: what is checked is the ranks' error path, the same for every task, and its ranks start
    without importing transformers (the nano Llama's cost seconds of CPU a rank)."""
    argv = ["--device", "cpu", "--task", "image-classification", "--batch-size", "4"]
    argv += ["--steps", "6", "--eval-interval", "6", "--lr", "1e30"]
    argv += ["--grad-clip", "0", "--quiet", "--out", str(tmp_path / "run")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-port", str(free_port())]  # tests run beside each other
    done = subprocess.run(
        [*torchrun, "-m", "lowbit", "train", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0
    printed = [line for line in done.stderr.splitlines() if line.startswith("lowbit: error:")]
    assert len(printed) == 1, done.stderr
    assert " is nan at step " in printed[0] and "fix: lower --lr" in printed[0]
