"""A usage error of a multi-process run is printed once, not once per rank."""

import json
import os
import subprocess
import sys

from lowbit.cli import main

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
    "Terminating process N via signal SIGTERM" warning came with it)."""
    argv = ["train", "--nproc", "2", "--device", "cpu", "--model", "nano", "--steps", "1"]
    argv += ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]
    done = subprocess.run(
        [sys.executable, "-m", "lowbit", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"lowbit: error: {tmp_path / 'missing'}: no such file, folder or glob; fix: check the "
        "data path"
    ]
