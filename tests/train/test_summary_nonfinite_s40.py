"""Session 40: a run whose loss went non-finite for good says so in its summary's train loss,
which averages only the finite losses of the last steps: it read as the mean of the steps before
the divergence, unlabelled (an fp16-low run NaN from its second step: "train loss 2.3431")."""

import pytest

from lowbit.cli import main


def test_the_train_loss_line_counts_the_non_finite_steps_it_left_out(tmp_path, capsys):
    argv = ["train", "--task", "image-classification", "--recipe", "fp16-low", "--lr", "1e30"]
    argv += ["--steps", "6", "--eval-interval", "6", "--batch-size", "8", "--quiet"]
    with pytest.warns(UserWarning, match="past fp16's largest value"):  # the update overflowed
        assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    (line,) = [line for line in printed.splitlines() if line.lstrip().startswith("train loss")]
    assert line.endswith("(mean of the last steps; 5 of them non-finite, left out)"), line
    assert "skipped steps 5" in printed
