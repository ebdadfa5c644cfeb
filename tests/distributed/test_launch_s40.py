"""Session 40: `lowbit train --resume RUN --nproc 2` refuses in its launcher, in one line and
before any rank starts, a --steps below the run's step and a checkpoint folder cut short; each
rank refused them only after its start (`time lowbit train --resume RUN --nproc 2 ...` of a
digits run on a busy 2-core machine: 17 s and 41 s, now 4 s and 8 s)."""

from __future__ import annotations

import shutil

import pytest

from lowbit.cli import main
from lowbit.train import checkpoint
from tests.distributed.test_preflight_s35 import no_ranks  # noqa: F401 (a fixture)
from tests.once import run_once_per_session

DIGITS = ["--task", "image-classification", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """A digits run of one process with --strategy ddp (its checkpoints are DCP folders, as two
    processes write them) at step 4, checkpoints at steps 2 and 4. Trained once per session
    (tests that resume it copy it)."""

    argv = ["train", *DIGITS, "--strategy", "ddp", "--steps", "4", "--save-interval", "2"]
    return run_once_per_session(tmp_path_factory, "launch-s40", argv)


def test_a_resume_shorter_than_the_run_is_refused_before_any_rank(
    dcp_run,
    tmp_path,
    capsys,
    no_ranks,  # noqa: F811
):
    run = tmp_path / "run"  # a copy: a refused resume locks the run and checks it is writable
    shutil.copytree(dcp_run, run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--nproc", "2", "--steps", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "lowbit: error: steps 2 is below the run's step 4; fix: ask for at least 4 steps, or "
        "leave --steps/--epochs out to keep the run's length"
    ]
    assert no_ranks == []


def test_a_shard_cut_short_is_refused_before_any_rank(dcp_run, tmp_path, capsys, no_ranks):  # noqa: F811
    import shutil

    run = tmp_path / "run"
    shutil.copytree(dcp_run, run)
    newest = checkpoint.latest(run)
    shard = sorted(newest.glob("*.distcp"))[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--nproc", "2", "--steps", "6"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"lowbit: error: {newest}: unreadable checkpoint (EOFError: {shard.name} holds "
        f"{size // 2} of the {size} bytes its .metadata lists); fix: move it out of "
        f"{newest.parent}, so that step-0000002.dcp is the newest"
    )
    assert no_ranks == []


def test_a_metadata_file_cut_short_is_named(dcp_run, tmp_path, capsys, no_ranks):  # noqa: F811
    """It read "(UnpicklingError: pickle data was truncated)", naming no file (review R3)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(dcp_run, run)
    newest = checkpoint.latest(run)
    (newest / ".metadata").write_bytes((newest / ".metadata").read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--nproc", "2", "--steps", "6"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"lowbit: error: {newest}: unreadable checkpoint (EOFError: .metadata cut short or not "
        "DCP's ("
    ), line
    assert no_ranks == []
