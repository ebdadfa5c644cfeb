"""Session 27: `lowbit estimate` takes `lowbit train`'s names for its data-parallel settings."""

from lowbit.cli import main


def _estimate(capsys, *argv) -> str:
    assert main(["estimate", "--model", "tiny", "--seq", "64", *argv]) == 0
    return capsys.readouterr().out


def test_nproc_and_strategy_are_gpus_and_sharding(capsys):
    """A user sizing `lowbit train --nproc 4 --strategy fsdp` typed those flags and was refused
    ("unrecognized arguments"); ddp, train's default strategy, is no sharding here."""
    sharded = _estimate(capsys, "--gpus", "4", "--sharding", "fsdp")
    assert _estimate(capsys, "--nproc", "4", "--strategy", "fsdp") == sharded
    whole = _estimate(capsys, "--gpus", "4", "--sharding", "none")
    assert _estimate(capsys, "--nproc", "4", "--strategy", "ddp") == whole
    assert whole != sharded
