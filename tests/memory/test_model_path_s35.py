"""Session 35: `lowbit estimate --model` of a path that names no model said "'X' is neither a
model size nor a config.json" whatever was there, with a fix that left out run folders: of a
`lowbit compare` folder (a user pointing at their study, not at one of its runs), of a folder
without a config.json, and of a mistyped path. Each now says what is there and the fix."""

import json

import pytest

from lowbit.cli import main


def _error(capsys, model) -> str:
    assert main(["estimate", "--model", str(model)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_a_compare_folder_is_pointed_to_its_runs(tmp_path, capsys):
    study = tmp_path / "study"
    (study / "runs" / "fp32" / "seed-0").mkdir(parents=True)
    (study / "compare.json").write_text(json.dumps({"recipes": ["fp32"]}))
    line = _error(capsys, study)
    assert "a lowbit compare study, not one run" in line
    assert f"fix: one of its runs such as {study / 'runs' / 'fp32' / 'seed-0'}" in line


@pytest.mark.parametrize(
    "where, said",
    [
        ("missing/config.json", "nothing at that path"),
        ("empty", "holds no config.json, and is no lowbit run folder"),
    ],
)
def test_a_path_without_a_model_says_what_is_there(tmp_path, capsys, where, said):
    (tmp_path / "empty").mkdir()
    line = _error(capsys, tmp_path / where)
    assert said in line
    assert line.endswith(
        "fix: a size name, a Hugging Face config.json or its folder, or a lowbit run folder"
    )
