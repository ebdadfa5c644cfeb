"""Session 38: a lowbit run given as the --model of `lowbit train --task image-classification`
was "unknown CNN size 'runs/digits'", with no word of --resume, the way to train that CNN on."""

import shlex

from lowbit.cli import main
from lowbit.train.config import TrainConfig, resolve, write


def _run(folder, task):
    """A run folder as `lowbit train` writes it (its config.yaml)."""
    folder.mkdir(parents=True)
    model = "tiny" if task == "image-classification" else "nano"
    write(resolve(TrainConfig(out=str(folder), task=task, model=model)), folder)
    return folder


def _train_error(capsys, model, out) -> str:
    argv = ["train", "--task", "image-classification", "--model", str(model), "--steps", "1"]
    assert main([*argv, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not out.exists()
    return lines[0]


def test_a_digits_run_as_the_model_names_resume(tmp_path, capsys):
    run = _run(tmp_path / "digits", "image-classification")
    (run / "checkpoints").mkdir()
    fix = (
        "fix: --model tiny or small for image-classification (a new CNN), or --resume "
        f"{shlex.quote(str(run))} to go on training that one"
    )
    assert _train_error(capsys, run, tmp_path / "out") == (
        f"lowbit: error: --model {run}: a lowbit run, not a CNN size; image-classification builds "
        f"its CNN afresh at a size (tiny, small); {fix}"
    )
    inside = run / "checkpoints"
    assert _train_error(capsys, inside, tmp_path / "out").startswith(
        f"lowbit: error: --model {inside}: inside the lowbit run {run}, not a CNN size;"
    )


def test_a_language_models_run_as_the_model_names_the_sizes_alone(tmp_path, capsys):
    run = _run(tmp_path / "lm", "causal-lm")
    assert _train_error(capsys, run, tmp_path / "out").endswith(
        "not a CNN size; image-classification builds its CNN afresh at a size (tiny, small); "
        "fix: --model tiny or small for image-classification"
    )
