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
