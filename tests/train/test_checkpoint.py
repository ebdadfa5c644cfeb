import pytest
import torch

from lowbit.errors import UsageError
from lowbit.train import checkpoint


def test_keep_last_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save({"step": step}, tmp_path, step, keep_last=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-0000003.pt", "step-0000004.pt"]
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 4


def test_crash_mid_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    checkpoint.save({"step": 1, "w": torch.ones(3)}, tmp_path, 1, keep_last=1)

    def torn_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"step": 2}, tmp_path, 2, keep_last=1)
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["step-0000001.pt"]  # no torn step-2 file, no temporary left behind
    assert torch.equal(checkpoint.load(checkpoint.latest(tmp_path))["w"], torch.ones(3))


def test_find_without_checkpoint_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        checkpoint.find(tmp_path)


def test_an_unreadable_checkpoint_is_a_usage_error_naming_the_previous_one(tmp_path):
    for step in (1, 2):
        checkpoint.save({"step": step}, tmp_path, step, keep_last=2)
    newest = checkpoint.latest(tmp_path)
    newest.write_bytes(b"/\x81\xb2 not a checkpoint")
    with pytest.raises(UsageError, match="unreadable checkpoint") as error:
        checkpoint.load(newest)
    assert f"fix: move it out of {newest.parent}, so that step-0000001.pt is the newest" in str(
        error.value
    )
    assert newest.read_bytes() == b"/\x81\xb2 not a checkpoint"  # kept for a look


def test_a_foreign_only_checkpoint_says_to_start_the_run_again(tmp_path):
    path = checkpoint.path_for(tmp_path, 1)
    path.parent.mkdir()
    torch.save(torch.ones(2), path)
    with pytest.raises(UsageError, match=r"not a lowbit checkpoint\); fix: .*only checkpoint"):
        checkpoint.load(path)


def _flip_a_byte_of_the_largest_record(path):
    """Flip one byte in the middle of the data of the checkpoint's largest zip record (a
    tensor's storage): what a bit error on the disk does."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[record.header_offset + 26 : record.header_offset + 30]
    )
    start = record.header_offset + 30 + name_len + extra_len
    data[start + record.file_size // 2] ^= 0x40
    path.write_bytes(data)


def test_a_checkpoint_whose_bytes_changed_on_disk_is_refused_not_resumed(tmp_path, capsys):
    """torch's reader does not check the CRC-32 it writes: a checkpoint with a flipped bit in a
    tensor loaded without a word, and the run resumed from weights it never saved."""
    from lowbit.cli import main

    run = tmp_path / "run"
    common = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
    argv = ["train", *common, "--eval-interval", "2", "--quiet", "--out", str(run)]
    assert main([*argv, "--steps", "2"]) == 0
    saved = run / "checkpoints" / "step-0000002.pt"
    _flip_a_byte_of_the_largest_record(saved)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"lowbit: error: {saved}: unreadable checkpoint (its record ")
    assert "fails its CRC-32 check: the file changed since it was saved); fix: " in err
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step-0000002.pt"]
