"""Session 30's hunt on the image-classification task."""

import json

from lowbit.cli import main

DIGITS = ["--task", "image-classification", "--batch-size", "8", "--steps", "1", "--quiet"]


def test_an_eval_batches_the_digits_task_ignores_is_warned_of(tmp_path, capsys):
    """`--eval-batches 3` on the digits task was silently ignored: the run evaluated all 270
    validation images (34 batches of 8), and the user believed it had evaluated 3 batches."""
    run = tmp_path / "run"
    assert (
        main(["train", *DIGITS, "--eval-batches", "3", "--recipe", "fp32", "--out", str(run)]) == 0
    )
    err = capsys.readouterr().err
    warning = (
        "lowbit: warning: eval_batches (--eval-batches) 3 does not apply to task "
        "image-classification, which evaluates its whole validation split (270 images, 34 "
        "batches of 8); ignored\n"
    )
    assert err.count(warning) == 1 and err.count("eval_batches") == 1, err
    final = json.loads((run / "run.json").read_text())["final_metrics"]
    assert main(["eval", str(run), "--json"]) == 0  # the whole split, as before
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final == {key: whole[key] for key in final}


def test_an_eval_batches_that_covers_the_digits_split_is_not_warned_of(tmp_path, capsys):
    argv = [*DIGITS, "--eval-batches", "34", "--recipe", "fp32", "--out", str(tmp_path / "run")]
    assert main(["train", *argv]) == 0
    assert "eval_batches" not in capsys.readouterr().err
