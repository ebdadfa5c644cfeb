"""Session 37: a new user's walk through multi-process training (DDP/FSDP2 on gloo ranks)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pathlib

from lowbit.cli import main
from lowbit.distributed import launch
from tests.distributed.helpers import on_ranks

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1", "--quiet"]


class _FullDisk(io.FileIO):
    """A checkpoint shard on a disk that fills up after its first kilobyte."""

    def write(self, data):
        if self.tell() + len(data) > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _train(*argv) -> tuple[int | str, str]:
    """``lowbit`` with ``argv`` in this rank: its exit status (or what escaped it) and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code: int | str = main([str(a) for a in argv])
        except BaseException as error:  # a traceback where one line was due
            code = type(error).__name__
    return code, err.getvalue()


def _save_on_a_full_disk(rank, world, out):
    """Train with a checkpoint every step, the disk full as step 2 saves; resume once it is not."""
    path_open = pathlib.Path.open

    def open_on_a_full_disk(self, mode="r", *args, **kwargs):
        if "step-0000002" in str(self) and str(self).endswith(".distcp") and "w" in mode:
            return _FullDisk(self, mode)
        return path_open(self, mode, *args, **kwargs)

    pathlib.Path.open = open_on_a_full_disk
    try:
        run = ["train", *NANO, "--steps", "3", "--save-interval", "1", "--strategy", "ddp"]
        failed = _train(*run, "--out", out)
    finally:
        pathlib.Path.open = path_open
    # rank 0 removes the partial checkpoint before it raises; another rank may look sooner
    kept = (
        sorted(p.name for p in (pathlib.Path(out) / "checkpoints").iterdir()) if rank == 0 else None
    )
    resumed = _train("train", "--resume", out, "--strategy", "ddp", "--quiet")
    return failed, kept, resumed[0]


def test_a_full_disk_as_the_ranks_save_is_one_line_and_the_run_resumes(tmp_path):
    """DCP wraps each rank's failed write in a `CheckpointException` (a BaseException), and
    torch's zip writer's "unexpected pos" in place of the OSError: each rank printed its
    traceback (and the `--nproc` launcher `rank 1 failed: RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos 704 vs 598`), and the partial shards stayed on
    the full disk. Now: the one-process run's line, the partial checkpoint gone, the last one
    kept, and the run resumes from it."""
    out = tmp_path / "run"
    ranks = on_ranks(_save_on_a_full_disk, 2, timeout=240, group=False, out=str(out))
    assert ranks[0][1] == ["step-0000001.dcp"]  # no partial .step-0000002.dcp.tmp
    for (code, err), _, resumed in ranks:
        assert code == 1, err
        assert err.strip().splitlines() == [
            f"lowbit: error: {out}: cannot write the run at step 2 (No space left on device); the "
            f"last complete checkpoint step-0000001.dcp is intact; fix: free disk space, then "
            f"lowbit train --resume {out}"
        ]
        assert resumed == 0


def _train_on_this_nodes_copy(rank, world, data, out):
    """Train on this rank's copy of the data (``data[rank]``: the same path on two nodes)."""
    return _train("train", *NANO, "--steps", "1", "--data", data[rank], "--out", out)


def test_ranks_that_read_other_data_are_refused(tmp_path):
    """Under torchrun across nodes each node reads its own copy of --data: where one differs (a
    copy half synced, another version), every rank trained silently on its own data, each
    slicing its rows of another global batch. Now every rank refuses it at the start."""
    text = "\n\n".join(
        f"paragraph {i}: the quick brown fox jumps over the dog." for i in range(300)
    )
    copies = [tmp_path / "node0.txt", tmp_path / "node1.txt"]
    copies[0].write_text(text, encoding="utf-8")
    copies[1].write_text(text.upper(), encoding="utf-8")
    out = tmp_path / "run"
    ranks = on_ranks(
        _train_on_this_nodes_copy,
        2,
        timeout=240,
        group=False,
        data=list(map(str, copies)),
        out=str(out),
    )
    for code, err in ranks:
        assert code == 2, err
        assert err.strip().splitlines() == [
            "lowbit: error: rank 1 reads other data than rank 0 (--data, or the built-in "
            "corpus of each node's Python, holds other contents: another node, another copy?); "
            "fix: give every rank the same data (a shared folder, identical copies, one Python)"
        ]
    assert not out.exists()


def test_a_one_process_run_resumed_with_nproc_is_refused_before_the_ranks_start(
    tmp_path, capsys, monkeypatch
):
    """Refused by every rank only after each had started, built the model and printed its
    warnings: half a minute on 2 cores for a one-line refusal the launcher can make at once."""
    run = tmp_path / "run"
    assert main(["train", *NANO, "--steps", "1", "--out", str(run)]) == 0
    capsys.readouterr()

    def spawn(*args, **kwargs):
        raise AssertionError("the ranks started")

    monkeypatch.setattr(launch, "spawn", spawn)
    code = main(["train", "--resume", str(run), "--nproc", "2", "--steps", "2"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"lowbit: error: {run}/checkpoints/step-0000001.pt: a one-process checkpoint cannot "
        "resume in several processes (--nproc, --strategy, torchrun); fix: resume without "
        "--strategy/--nproc"
    )
