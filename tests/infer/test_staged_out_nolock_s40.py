"""Hidden folders quantize/prune/export write --out into, where the filesystem has no locks (NFS).

Without a lock to tell a live writer from a killed one, the second of two writers into one new
--out deleted the first one's hidden folder as stale, and the first ended in a SafetensorError
traceback. Now a hidden folder is removed there only once it is an hour unchanged, and a writer
whose folder vanished all the same ends in one line.
"""

import errno
import fcntl
import os
import shutil
import time
from pathlib import Path

import pytest
import safetensors.torch

from lowbit.cli import main

from .test_hunt_s23 import one_line_error


@pytest.fixture
def no_locks(monkeypatch):
    """Every flock fails as where the filesystem has none (ENOLCK)."""

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


def _on_first_save(monkeypatch, action):
    """Run ``action(folder)`` when the first model.safetensors is about to be written."""
    save_file, calls = safetensors.torch.save_file, []

    def save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 1:
            action(Path(filename).parent)
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save)


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_two_writers_into_one_new_out_without_locks(
    lm_run, tmp_path, no_locks, monkeypatch, capsys
):
    out = tmp_path / "q"
    second = []
    _on_first_save(
        monkeypatch,
        lambda _: second.append(main(["quantize", str(lm_run), "--to", "int4", "--out", str(out)])),
    )
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out)]) == 2
    assert second == [0]
    one_line_error(capsys, "exists and is not empty")
    assert (out / "quantization.json").is_file() and _hidden(tmp_path) == []


def test_only_an_hour_old_hidden_folder_is_stale_without_locks(lm_run, tmp_path, no_locks):
    out = tmp_path / "q"
    old, recent = tmp_path / ".q.partial-old", tmp_path / ".q.partial-recent"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    hour_ago = time.time() - 3700
    for item in (old / "model.safetensors", old):
        os.utime(item, (hour_ago, hour_ago))
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out)]) == 0
    assert _hidden(tmp_path) == [recent.name]


def test_a_hidden_folder_deleted_while_written_is_one_line(lm_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    _on_first_save(monkeypatch, lambda folder: shutil.rmtree(folder))
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out)]) == 2
    one_line_error(capsys, "was deleted meanwhile")
    assert list(tmp_path.iterdir()) == []


def test_a_hidden_folder_another_process_writes_into_is_left_alone(lm_run, tmp_path):
    """Its lock held elsewhere, the folder was kept, but `os.close(False)` closed stdin (fd 0)."""
    try:
        os.fstat(0)
    except OSError:
        os.open(os.devnull, os.O_RDONLY)  # gets fd 0
    live = tmp_path / ".q.partial-live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
        try:
            os.fstat(0)
        except OSError:
            os.open(os.devnull, os.O_RDONLY)
            pytest.fail("standard input (fd 0) was closed")
    finally:
        os.close(fd)
    assert _hidden(tmp_path) == [live.name]
