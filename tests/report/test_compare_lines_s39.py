"""Session 39: `lowbit compare` with the default --jobs 1 printed each run's ``step N: validation
loss`` lines as `lowbit train` prints them, naming no run: a study of several recipes and seeds
printed a column of losses of unknown runs. They name the run now, as its stop message does;
`lowbit train`'s own lines are as they were."""

from lowbit.cli import main

DIGITS = ["--task", "image-classification", "--batch-size", "4", "--eval-interval", "2"]


def _validation_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "validation loss" in line]


def test_compare_names_the_run_on_its_validation_lines(tmp_path, capsys):
    study = tmp_path / "study"
    argv = ["compare", "--recipes", "fp32", "--seeds", "1", "--steps", "4", "--no-plots"]
    assert main([*argv, *DIGITS, "--out", str(study)]) == 0
    lines = _validation_lines(capsys.readouterr().out)
    assert [line.split(" validation")[0] for line in lines] == [
        "study: fp32 seed 0: step 2:",
        "study: fp32 seed 0: step 4:",
        "[1/1] fp32 seed 0:",
    ], lines
    assert main(["train", *DIGITS, "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    lines = _validation_lines(capsys.readouterr().out)
    assert lines[0].startswith("step 2: validation loss "), lines
