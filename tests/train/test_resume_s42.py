"""Session 42: a run's own files that every load reads again (a causal LM's tokenizer/, a tagger's
labels.json) are fingerprinted in run.json (``run_files``); one changed since is refused in one
line naming it, by `--resume` and by `lowbit eval`, not resumed on other token or tag ids."""

from __future__ import annotations

import json
import random

from lowbit.cli import main
from lowbit.data import build_tokenizer
from lowbit.data.tokenizers import CONFIG_NAME
from tests.train.test_eval_data_s38 import _tagger

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "sigma",
]


def _text(path, words, seed: int) -> None:
    rng = random.Random(seed)
    lines = (" ".join(rng.choice(words) for _ in range(20)) for _ in range(120))
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")


def _one_line_refusal(argv, capsys) -> str:
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    return line


def test_a_causal_lm_run_whose_tokenizer_was_replaced_is_refused(tmp_path, capsys):
    """Another BPE tokenizer of the same size put in the run's tokenizer/ (a copy from another
    run) was resumed and evaluated without a word, on other token ids for the same text."""
    data, run = tmp_path / "a.txt", tmp_path / "run"
    _text(data, WORDS, 0)
    argv = ["train", "--data", str(data), "--tokenizer", "bpe", "--vocab-size", "280"]
    argv += ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
    argv += ["--recipe", "fp32", "--steps", "2", "--quiet", "--out", str(run)]
    assert main(argv) == 0
    # a resume keeps the record: the run's files are checked again after it
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert json.loads((run / "run.json").read_text())["run_files"]
    other = tmp_path / "other.txt"  # the same number of ids, learned from other words
    _text(other, [word[::-1] for word in WORDS], 1)
    foreign = build_tokenizer("bpe", [other.read_text()], 280)
    assert (
        foreign.vocab_size
        == json.loads((run / "tokenizer" / CONFIG_NAME).read_text())["vocab_size"]
    )
    foreign.save(run / "tokenizer")
    capsys.readouterr()
    for command in (["train", "--resume", str(run), "--steps", "4"], ["eval", str(run)]):
        line = _one_line_refusal(command, capsys)
        assert "tokenizer/tokenizer.json changed" in line and "fix: put those back" in line, line


def test_a_tagger_run_whose_labels_were_reordered_is_refused(tmp_path, capsys):
    """labels.json in another order (the same tags) read each output as another tag."""
    run, _ = _tagger(tmp_path)
    labels = json.loads((run / "labels.json").read_text())
    (run / "labels.json").write_text(json.dumps([labels[0], *reversed(labels[1:])]) + "\n")
    capsys.readouterr()
    for command in (["eval", str(run)], ["train", "--resume", str(run), "--steps", "2"]):
        line = _one_line_refusal(command, capsys)
        assert "labels.json changed" in line, line


def test_a_setting_edited_in_the_runs_config_yaml_is_refused_with_a_fix_that_works(
    tmp_path, capsys
):
    """The refusal said "resume ... without --lr" to a user who gave no --lr: the value came from
    the run's config.yaml, edited since, and a resume without the flag was refused again."""
    run = tmp_path / "run"
    argv = ["train", "--model", "nano", "--seq-len", "16", "--batch-size", "4", "--steps", "1"]
    assert (
        main([*argv, "--eval-batches", "1", "--recipe", "fp32", "--quiet", "--out", str(run)]) == 0
    )
    config = run / "config.yaml"
    (line,) = [line for line in config.read_text().splitlines() if line.startswith("lr: ")]
    config.write_text(config.read_text().replace(line, "lr: 0.001"))
    capsys.readouterr()
    line = _one_line_refusal(["train", "--resume", str(run), "--steps", "2"], capsys)
    assert "(--lr, as the run's config.yaml says now)" in line, line
    assert "fix: resume with lr: 0.003 put back into its config.yaml" in line, line
    assert "or without --lr" not in line, line  # alone, the flag left out: refused again
