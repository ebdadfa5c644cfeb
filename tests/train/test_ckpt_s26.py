"""Nothing lost on failure (session 26): a full disk, --overwrite and a hand-written config.yaml in
--out, two runs into one folder, a Ctrl-C as the closing sample runs."""

import errno
import io
import json
import os
import socket
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train
from lowbit.train import checkpoint as ckpt
from lowbit.train import generate as generate_module
from lowbit.train import logging as logging_module

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
NANO_RUN = [*NANO, "--steps", "4", "--eval-interval", "2", "--quiet"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _train_losses(run_dir) -> list[tuple[int, float]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


class _FullDisk(io.FileIO):
    """A checkpoint file on a disk that fills up after its first kilobyte."""

    room = 1000

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


class _FlushFailsOnClose(io.StringIO):
    """A metrics file whose buffered records cannot be written at close: the disk is full."""

    def close(self):
        super().close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_saving_is_one_line_and_the_run_resumes_from_the_last_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """torch's zip writer, closed after a write failed for a full disk, raised "unexpected pos"
    in place of the OSError: a traceback, and no word of the folder, the checkpoint kept or how
    to go on. The previous checkpoint survives, and the run resumes from it bit-identically."""
    run = tmp_path / "run"

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if "step-0000004" in str(path):
            return _FullDisk(path, mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt, "open", open_on_a_full_disk, raising=False)
    code, _, err = run_cli(capsys, "train", *NANO_RUN, "--out", run)
    monkeypatch.undo()
    assert code == 1
    assert err.strip() == (
        f"lowbit: error: {run}: cannot write the run at step 4 (No space left on device); the "
        f"last complete checkpoint step-0000002.pt is intact; fix: free disk space, then lowbit "
        f"train --resume {run}"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002.pt"]

    assert run_cli(capsys, "train", "--resume", run, "--quiet")[0] == 0
    assert run_cli(capsys, "train", *NANO_RUN, "--out", tmp_path / "straight")[0] == 0
    assert _train_losses(run) == _train_losses(tmp_path / "straight")


def test_a_disk_that_fills_between_checkpoints_names_the_run_and_what_is_kept(
    tmp_path, capsys, monkeypatch
):
    """A full disk met by the metrics (TensorBoard's events, metrics.jsonl) between two saves
    was the bare "No space left on device", without the folder; and the closing flush of the
    metrics, failing on the same disk, replaced the error that stopped the run."""
    run = tmp_path / "run"
    log = logging_module.MetricsLogger.log

    def log_on_a_full_disk(self, step, split, metrics):
        if step == 3:
            self._file.close()
            self._file = _FlushFailsOnClose()  # records the closing flush fails to write, too
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return log(self, step, split, metrics)

    monkeypatch.setattr(logging_module.MetricsLogger, "log", log_on_a_full_disk)
    code, _, err = run_cli(capsys, "train", *NANO_RUN, "--out", run)
    assert code == 1
    assert err.strip() == (
        f"lowbit: error: {run}: cannot write the run at step 3 (No space left on device); the "
        f"last complete checkpoint step-0000002.pt is intact; fix: free disk space, then lowbit "
        f"train --resume {run}"
    )


def test_overwrite_leaves_user_files_in_a_folder_that_holds_no_run(tmp_path, capsys):
    """--overwrite removes a run's files: in a folder of the user's that held no run, it
    deleted their checkpoints/ and tokenizer/ folders with everything in them."""
    out = tmp_path / "project"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "model.bin").write_bytes(b"weights")
    (out / "tokenizer").mkdir()
    (out / "notes.md").write_text("mine")
    code, _, err = run_cli(capsys, "train", *NANO_RUN, "--out", out, "--overwrite")
    assert code == 2
    assert err.strip() == (
        f"lowbit: error: {out}: holds no run (no config.yaml) for --overwrite to replace, but "
        "files it would delete (checkpoints, tokenizer); fix: choose another --out, or move them "
        "away"
    )
    assert (out / "checkpoints" / "model.bin").read_bytes() == b"weights"
    assert (out / "tokenizer").is_dir()


def test_a_config_file_the_user_wrote_in_out_is_not_replaced(tmp_path, capsys):
    """``--config exp/config.yaml --out exp``: a folder holding a config.yaml and nothing else
    passed for a run that stopped before its first checkpoint, and the run wrote its own
    config.yaml over the user's (their comments gone) without --overwrite."""
    exp = tmp_path / "exp"
    exp.mkdir()
    text = "# lr sweep, second try\nmodel: nano\nseq_len: 16\nbatch_size: 4\nsteps: 2\n"
    (exp / "config.yaml").write_text(text)
    code, _, err = run_cli(capsys, "train", "--config", exp / "config.yaml", "--out", exp)
    assert code == 2
    assert err.strip() == (
        f"lowbit: error: {exp}: holds a config.yaml but no run (no run.json); fix: choose another "
        "--out (a run writes its own config.yaml there), or --overwrite to replace it"
    )
    assert (exp / "config.yaml").read_text() == text


def test_a_second_run_into_the_folder_of_a_live_run_is_refused(tmp_path):
    """Two `lowbit train` into one --out: the second cleared the live run's files (its next
    write failed with a traceback, its run was lost), or trained beside it into the same
    checkpoints. Now the folder is locked while a run writes it; the lock ends with the run."""
    config = TrainConfig(
        model="nano", seq_len=16, batch_size=4, eval_batches=1, steps=3, out=str(tmp_path / "r")
    )
    refusals = []

    def start_another(trainer):
        if trainer.step_idx != 1:
            return
        for resume, overwrite in ((False, True), (True, False)):
            with pytest.raises(UsageError) as refused:
                train(config, resume=resume, overwrite=overwrite, quiet=True)
            refusals.append(str(refused.value))

    first = train(config, quiet=True, on_step=start_another)
    expected = (
        f"{config.out}: another lowbit process (pid {os.getpid()} on host "
        f"{socket.gethostname()}) is training into this folder; fix: wait until it "
        "ends (or stop it), or choose another --out"
    )
    assert refusals == [expected, expected]
    assert (first.status, first.steps) == ("completed", 3)
    assert [step for step, _ in _train_losses(config.out)] == [1, 2, 3]
    again = train(config, overwrite=True, quiet=True)  # the finished run let go of its folder
    assert _train_losses(again.run_dir) == _train_losses(first.run_dir)


def test_ctrl_c_during_the_closing_sample_skips_it_not_the_summary(tmp_path, capsys, monkeypatch):
    """The run is complete and saved when it samples; a Ctrl-C there printed "aborted" with
    exit 130 and no summary, as if the run were lost and needed a --resume."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_module, "sample_text", interrupted)
    code, out, err = run_cli(capsys, "train", *NANO_RUN, "--out", tmp_path / "r")
    assert (code, err) == (0, "")
    assert "4 steps (completed)" in out
    assert "sample:" not in out


def test_a_file_outside_the_run_that_cannot_be_read_is_not_called_a_run_not_written(
    tmp_path, capsys, monkeypatch
):
    """A permission error on a file outside the run folder (the data, met mid-run) was reported
    as the run folder refusing writes, with "make the folder writable" as the fix."""
    run, data = tmp_path / "run", tmp_path / "elsewhere" / "data.txt"
    log = logging_module.MetricsLogger.log

    def log_reading_unreadable_data(self, step, split, metrics):
        if step == 3:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(data))
        return log(self, step, split, metrics)

    monkeypatch.setattr(logging_module.MetricsLogger, "log", log_reading_unreadable_data)
    code, _, err = run_cli(capsys, "train", *NANO_RUN, "--out", run)
    assert code == 2
    assert err.strip().startswith(f"lowbit: error: {data}: Permission denied; fix:")
    assert "cannot write the run" not in err


def test_a_run_killed_as_it_writes_its_first_files_is_replaced_by_the_next(
    tmp_path, capsys, monkeypatch
):
    """A run killed after its config.yaml but before its run.json left a folder the next run
    refused as holding a hand-written config.yaml ("no run"), asking for --overwrite."""
    from lowbit.train.tasks import CausalLMTask

    run = tmp_path / "run"

    def killed(self, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(CausalLMTask, "save_artifacts", killed)
    assert run_cli(capsys, "train", *NANO_RUN, "--out", run)[0] == 130
    monkeypatch.undo()
    assert (run / "config.yaml").is_file()
    code, _, err = run_cli(capsys, "train", *NANO_RUN, "--out", run)
    assert code == 0, err
    assert [step for step, _ in _train_losses(run)] == [1, 2, 3, 4]
