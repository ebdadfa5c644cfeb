"""The run folder and the progress output (session 32): --overwrite in a folder holding the user's
config.yaml and tokenizer/, and the progress bar on a stderr that is a log file."""

import io
import re
import sys

from lowbit.cli import main
from lowbit.train import trainer as trainer_module

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_overwrite_keeps_the_users_tokenizer_beside_their_config_yaml(tmp_path, capsys):
    """A folder of the user's with their config.yaml and tokenizer/ (no run.json, no checkpoint):
    the refusal said "--overwrite to replace it", and --overwrite then deleted their tokenizer/
    with everything in it, as a run's own."""
    exp = tmp_path / "exp"
    (exp / "tokenizer").mkdir(parents=True)
    (exp / "tokenizer" / "vocab.txt").write_text("mine")
    (exp / "config.yaml").write_text("# mine\nmodel: nano\n")
    argv = ["train", *NANO, "--steps", "2", "--quiet", "--out", exp]
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert (exp / "tokenizer" / "vocab.txt").read_text() == "mine"
    assert code == 2
    assert err.strip() == (
        f"lowbit: error: {exp}: holds no run (a config.yaml but no run.json) for --overwrite to "
        "replace, but files it would delete (tokenizer); fix: choose another --out, or move them "
        "away"
    )
    code, _, err = run_cli(capsys, *argv)  # the refusal without --overwrite does not suggest it
    assert code == 2
    assert err.strip() == (
        f"lowbit: error: {exp}: holds a config.yaml but no run (no run.json), and files a run "
        "would replace (tokenizer); fix: choose another --out, or move them away"
    )
    assert (exp / "tokenizer" / "vocab.txt").read_text() == "mine"
    assert (exp / "config.yaml").read_text() == "# mine\nmodel: nano\n"
    assert sorted(p.name for p in exp.iterdir()) == ["config.yaml", "tokenizer"]


def test_a_log_file_gets_no_carriage_returns(tmp_path, capsys):
    """stderr a file (``2> log``, a batch job): the bar wrote a refresh per step joined by
    carriage returns into one huge line; the validation lines and summary still print."""
    argv = ["train", *NANO, "--steps", "3", "--eval-interval", "2", "--out", tmp_path / "run"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0
    assert "\r" not in err
    assert "step 2: validation loss" in out and "step 3: validation loss" in out
    assert "lowbit train: causal-lm nano, recipe bf16-mixed, 3 steps (completed)" in out


def test_a_log_file_gets_a_plain_progress_line(tmp_path, capsys, monkeypatch):
    """In place of the bar, a log gets a plain line of the step, loss and time left at most once
    a minute (every step here), so a long stretch between evaluations shows the run moving."""
    monkeypatch.setattr(trainer_module._LogProgress, "interval", 0.0)
    argv = ["train", *NANO, "--steps", "3", "--eval-interval", "2", "--out", tmp_path / "run"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0
    steps = re.findall(r"^causal-lm bf16-mixed: step (\d)/3, loss \d\.\d{4} .* left$", err, re.M)
    assert steps == ["1", "2", "3"]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's is."""

    def isatty(self) -> bool:
        return True


def test_a_terminal_keeps_the_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    argv = ["train", *NANO, "--steps", "2", "--out", tmp_path / "run"]
    assert main([str(a) for a in argv]) == 0
    bar = sys.stderr.getvalue()
    assert (
        "\r" in bar and "2/2" in bar and "loss " in bar and "causal-lm bf16-mixed: step" not in bar
    )
