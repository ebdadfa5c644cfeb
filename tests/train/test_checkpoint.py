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
