"""Session 32: the metrics of `lowbit eval` on checkpoints a user may hold (a diverged one)."""

import json
import math
import shutil

import pytest
import torch

from lowbit.cli import main


@pytest.fixture
def lm_run(nano_run):
    """The session's one-step nano run (tests/train/conftest.py)."""
    return nano_run


def _eval_json(run, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run), "--max-batches", "1", "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_perplexity_of_a_diverged_model_is_inf_not_a_clamped_number(lm_run, tmp_path, capsys):
    """A loss past exp's range (weights blown up 3000-fold: loss ~1000) printed a perplexity of
    exp(50) = 5.18e21, a finite number that read as measured; it is inf, as the loss says."""
    run = tmp_path / "diverged"
    shutil.copytree(lm_run, run)
    path = run / "checkpoints" / "step-0000001.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["lm_head.weight"].mul_(3000)
    torch.save(state, path)
    metrics = _eval_json(run, capsys)
    assert metrics["loss"] > 709.8  # exp overflows float64 past log(max) = 709.78
    assert metrics["ppl"] == "inf"  # metrics.jsonl's spelling of a non-finite number
    assert main(["eval", str(run), "--max-batches", "1", "--quiet"]) == 0
    assert "ppl inf" in capsys.readouterr().out


def test_perplexity_of_a_trained_model_is_exp_of_its_loss(lm_run, capsys):
    metrics = _eval_json(lm_run, capsys)
    assert metrics["ppl"] == math.exp(metrics["loss"])


def diverge_classifier(run) -> None:
    """Make a one-step tagger run diverged: its checkpoint's classifier weights all NaN."""
    path = run / "checkpoints" / "step-0000001.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["classifier.weight"].fill_(float("nan"))
    torch.save(state, path)


def test_a_tagger_whose_output_is_nan_scores_nan_not_its_share_of_o_words(tmp_path, capsys):
    """NaN logits' argmax is tag 0, "O": a diverged tagger's accuracy read as the share of "O"
    words (most of a NER set) and its entity F1 as 0, beside a NaN loss."""
    data = tmp_path / "tags"
    data.mkdir()
    sentence = "Ann B-PER\nLee I-PER\nran O\nin O\nRome B-LOC\nand O\nParis B-LOC\n\n"
    for name in ("train.txt", "dev.txt", "test.txt"):
        (data / name).write_text(sentence * 4, encoding="utf-8")
    run = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--data", str(data), "--seq-len", "12"]
    assert main([*argv, "--batch-size", "2", "--steps", "1", "--quiet", "--out", str(run)]) == 0
    diverge_classifier(run)
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["loss"] == metrics["accuracy"] == metrics["entity_f1"] == "nan"
    assert main(["eval", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "loss nan  accuracy nan  entity_f1 nan\n(the model's output holds NaN or inf" in out
