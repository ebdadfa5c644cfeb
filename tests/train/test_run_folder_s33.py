"""A run folder on a disk that fills up at the start or the end of a run (session 33)."""

import errno
import io
import json
import os

from lowbit.cli import main
from lowbit.train import logging as logging_module
from lowbit.train import trainer as trainer_module

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
NANO_RUN = [*NANO, "--steps", "4", "--eval-interval", "2", "--quiet"]
FULL = os.strerror(errno.ENOSPC)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _full_disk(*_, **__):
    raise OSError(errno.ENOSPC, FULL)


def _status(run) -> tuple[str, int]:
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    return info["status"], info["step"]


def _stopped_at_the_end(run, err) -> None:
    assert err.strip() == (
        f"lowbit: error: {run}: cannot write the run at step 4 ({FULL}); the last complete "
        f"checkpoint step-0000004.pt is intact; fix: free disk space, then lowbit train --resume "
        f"{run}"
    )


class _FlushFailsOnClose(io.StringIO):
    def close(self):
        super().close()
        raise OSError(errno.ENOSPC, FULL)


def test_a_full_disk_at_the_closing_flush_of_the_metrics_names_the_run(
    tmp_path, capsys, monkeypatch
):
    """The closing flush of the metrics, outside the loop's error handling, failing on a full
    disk: the bare "No space left on device" without the folder, and run.json left "running"."""
    run = tmp_path / "run"
    close = logging_module.MetricsLogger.close

    def close_on_a_full_disk(self, quietly=False):
        if not quietly:
            self._file.close()
            self._file = _FlushFailsOnClose()
        close(self, quietly)

    monkeypatch.setattr(logging_module.MetricsLogger, "close", close_on_a_full_disk)
    code, _, err = run_cli(capsys, "train", *NANO_RUN, "--out", run)
    monkeypatch.undo()
    assert code == 1
    _stopped_at_the_end(run, err)
    assert _status(run) == ("failed", 4)
    assert run_cli(capsys, "train", "--resume", run, "--quiet")[0] == 0
    assert _status(run) == ("completed", 4)


def test_a_full_disk_as_run_json_records_the_end_is_no_silent_success(
    tmp_path, capsys, monkeypatch
):
    """run.json's closing record failing on a full disk was suppressed: exit 0 and a summary, and
    a run.json that still said "running", as a killed run's does."""
    run = tmp_path / "run"
    write = trainer_module.write_atomically

    def write_on_a_full_disk(path, text):
        if '"completed"' in text:
            _full_disk()
        return write(path, text)

    monkeypatch.setattr(trainer_module, "write_atomically", write_on_a_full_disk)
    code, _, err = run_cli(capsys, "train", *NANO_RUN, "--out", run)
    monkeypatch.undo()
    assert code == 1
    _stopped_at_the_end(run, err)
    assert run_cli(capsys, "train", "--resume", run, "--quiet")[0] == 0
    assert _status(run) == ("completed", 4)


def test_a_full_disk_as_the_run_starts_names_the_folder(tmp_path, capsys, monkeypatch):
    """The first writes of a run (run.json, config.yaml, the tokenizer) came before the loop's
    error handling: a full disk there was the bare "No space left on device"."""
    run = tmp_path / "my run"
    monkeypatch.setattr(trainer_module, "write", _full_disk)  # config.yaml, after run.json
    code, _, err = run_cli(capsys, "train", *NANO_RUN, "--out", run)
    monkeypatch.undo()
    assert code == 1
    # no config.yaml to restart from: the command is the user's own, run again
    assert err.strip() == (
        f"lowbit: error: {run}: cannot write the run at step 0 ({FULL}); no checkpoint was "
        "saved; fix: free disk space"
    )
    assert _status(run) == ("failed", 0)
    assert run_cli(capsys, "train", *NANO_RUN, "--out", run)[0] == 0


class _WrappedInterrupt(BaseException):
    """As torch.distributed.checkpoint wraps a rank's KeyboardInterrupt (CheckpointException)."""


def test_a_second_ctrl_c_wrapped_by_a_save_still_aborts(tmp_path, capsys, monkeypatch):
    """A second Ctrl-C inside a save across ranks reached the trainer wrapped in DCP's
    CheckpointException: a traceback and run.json "failed" where the run was aborted as asked."""
    run = tmp_path / "run"

    def save_interrupted_twice(self, logger):
        self.abort_requested = True  # what the second Ctrl-C's handler records
        raise _WrappedInterrupt("KeyboardInterrupt on rank 0")

    monkeypatch.setattr(trainer_module.Trainer, "_save", save_interrupted_twice)
    code, _, err = run_cli(capsys, "train", *NANO_RUN, "--out", run)
    assert code == 130
    assert err.strip().startswith("lowbit: aborted;"), err
    assert _status(run)[0] == "aborted"
