"""Session 31: tags that occur only in the validation or test split (a typo, a type the training
file lacks) are warned of: the model gets an output for each that no training word teaches. A
folder with a run's settings and no checkpoint is told the command that restarts it."""

import pytest

from lowbit.cli import main

TRAINED = ["Ann B-PER", "Lee I-PER", ""]


def _train(tmp_path, dev: list[str]) -> int:
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    train = ["Ann B-PER", "Lee I-PER", "ran O", ""] * 8
    for name, lines in (("train.txt", train), ("dev.txt", dev), ("test.txt", train)):
        (folder / name).write_text("\n".join(lines))
    argv = ["train", "--task", "token-classification", "--model", "tiny", "--seq-len", "12"]
    argv += ["--batch-size", "4", "--steps", "1", "--data", str(folder), "--quiet"]
    return main([*argv, "--out", str(tmp_path / "run")])


def _untrained_warning(tmp_path, capsys, dev: list[str]) -> str:
    assert _train(tmp_path, dev) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "in training (" in line]
    assert len(warned) == 1, warned
    return warned[0]


def test_tags_found_only_in_validation_are_warned_of(tmp_path, capsys):
    """One tag in the singular (session 37: "1 tag ... never occur"), two in the plural."""
    one = _untrained_warning(tmp_path, capsys, ["Rome B-LCO", "ran O", "", *TRAINED] * 4)
    assert "1 tag of the validation split never occurs in training (B-LCO)" in one
    assert "the model cannot learn it and its words count as errors; fix:" in one
    two = ["Rome B-LCO", "Acme B-ORGG", "ran O", "", *TRAINED] * 4
    two = _untrained_warning(tmp_path / "two", capsys, two)
    assert "2 tags of the validation split never occur in training (B-LCO, B-ORGG)" in two
    assert "the model cannot learn them and their words count as errors; fix:" in two


def test_splits_tagged_as_training_is_no_warning(tmp_path, capsys):
    assert _train(tmp_path, ["Ann B-PER", "Lee I-PER", "ran O", ""] * 4) == 0
    assert "never occur" not in capsys.readouterr().err  # nor "never occurs"


def test_a_folder_with_settings_but_no_checkpoint_names_its_restart(tmp_path, capsys):
    """A folder holding a run's config.yaml (no run.json, no checkpoint) was told `lowbit train
    --out RUN`, which trains the default task there, not the run's own settings."""
    from lowbit.errors import UsageError
    from lowbit.train import checkpoint

    (tmp_path / "config.yaml").write_text("task: token-classification\n")
    with pytest.raises(UsageError) as error:
        checkpoint.find(tmp_path)
    assert f"--config {tmp_path / 'config.yaml'}" in str(error.value)
