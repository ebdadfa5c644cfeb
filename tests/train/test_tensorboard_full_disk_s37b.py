"""A full disk between checkpoints as TensorBoard writes its event file, from a thread of its own:
the thread's 15-line traceback came before lowbit's one-line error (session 37)."""

import errno
import os
import re
import threading

from tensorboard.compat.tensorflow_stub.io import gfile

from lowbit.cli import main

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
FULL = os.strerror(errno.ENOSPC)


def test_a_full_disk_under_the_event_writer_thread_is_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    append = gfile.LocalFileSystem.append

    def full_after_the_first_checkpoint(self, *args, **kwargs):
        if (run / "checkpoints" / "step-0000002.pt").exists():
            raise OSError(errno.ENOSPC, FULL)
        return append(self, *args, **kwargs)

    said = []  # what the threads' hook was given to print
    monkeypatch.setattr(threading, "excepthook", said.append)
    monkeypatch.setattr(gfile.LocalFileSystem, "append", full_after_the_first_checkpoint)
    argv = ["train", *NANO, "--steps", "4", "--eval-interval", "2", "--quiet", "--out", run]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1
    assert said == []
    assert re.fullmatch(
        rf"lowbit: error: {run}: cannot write the run at step [34] \({FULL}\); the last complete "
        rf"checkpoint step-0000002.pt is intact; fix: free disk space, then lowbit train --resume "
        rf"{run}\n",
        err,
    ), err
