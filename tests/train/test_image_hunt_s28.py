"""Session 28's hunt on the image-classification task."""

import json

from lowbit.cli import main


def test_the_accuracy_eval_prints_is_the_exact_fraction_of_correct_images(tmp_path, capsys):
    # a float32 mean gave 51 of 270 as 0.18888889253139496 in `lowbit eval --json`
    run = tmp_path / "run"
    argv = ["--task", "image-classification", "--batch-size", "8", "--steps", "1", "--quiet"]
    assert main(["train", *argv, "--recipe", "fp32", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    accuracy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    images = 270  # the validation split: 15% of 1797, stratified
    correct = round(accuracy * images)
    assert 0 < correct < images and accuracy == correct / images


def test_an_image_run_given_to_export_is_named_with_an(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--task", "image-classification", "--batch-size", "8", "--steps", "1", "--quiet"]
    assert main(["train", *argv, "--recipe", "fp32", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert f"{run} is an image-classification run; fix:" in capsys.readouterr().err


def test_token_accuracy_is_the_exact_fraction_of_labelled_tokens():
    """The token-classification accuracy was a float32 mean too (tasks.py's `_accuracy`)."""
    import torch

    from lowbit.train.tasks import _accuracy

    labels = torch.tensor([0, 1, 2] * 90)
    preds = labels.clone()
    preds[:219] = 3  # 51 of 270 right, as the image case
    assert _accuracy(labels, preds) == 51 / 270
    assert _accuracy(labels[:0], preds[:0]) != _accuracy(labels[:0], preds[:0])  # NaN for none
