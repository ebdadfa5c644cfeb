"""Session 36: follow-ups of the `lowbit estimate` walk.

- ``lowbit train --model runs/R/checkpoints/step-0000004.pt`` (a path inside a run folder) said
  "not a Hugging Face checkpoint folder (no config.json)"; it now names the run and the ways to
  train from its weights (`lowbit export` it and --model the export, or --resume it), as
  `lowbit estimate` names the run (`lowbit.models.pretrained.run_folder_above`).
- ``lowbit estimate --model ""`` (an unset shell variable) estimated the current folder.
- A run folder whose config.yaml is empty was read as the default settings (`lowbit estimate`
  estimated a `tiny` model the run never trained; `eval` and --resume failed on the mismatch).
- The single-recipe text of `lowbit estimate` left out the estimate's notes (FSDP's gathered
  parameters), which only --json gave.
- An unknown optimizer or optimizer-state precision (estimate's --optimizer-state,
  `build_optimizer`) was refused without a fix.
- A CNN's run folder was refused with "fix: a run of one of causal-lm, token-classification";
  it now points to the memory table that run measured, and how to measure it again.
"""

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.optim import build_optimizer
from lowbit.train.config import TrainConfig, resolve, write


def _run(folder, **settings):
    """A run folder as `lowbit train` writes it (its config.yaml)."""
    folder.mkdir(parents=True)
    write(resolve(TrainConfig(out=str(folder), **{"model": "nano", **settings})), folder)
    return folder


def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("inside", ["checkpoints/step-0000004.pt", "checkpoints", "config.yaml"])
def test_train_from_a_path_inside_a_run_names_the_run_and_how(tmp_path, capsys, inside):
    run = _run(tmp_path / "runs" / "R")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-0000004.pt").write_bytes(b"\x80\x02 a pickled checkpoint")
    out = tmp_path / "ft"
    line = _error(capsys, "train", "--model", str(run / inside), "--steps", "1", "--out", str(out))
    assert line == (
        f"lowbit: error: {run / inside}: inside the lowbit run folder {run}, not a model; fix: "
        f"lowbit export {run} --out DIR (its last checkpoint) and train with --model DIR, or "
        f"--resume {run}"
    )
    assert not out.exists()


def test_estimate_refuses_an_empty_model(tmp_path, capsys, monkeypatch):
    _run(tmp_path / "here")  # the current folder a run folder: it was estimated
    monkeypatch.chdir(tmp_path / "here")
    line = _error(capsys, "estimate", "--model", "")
    assert line.startswith("lowbit: error: --model is an empty string; fix: give a size")


def test_a_run_whose_config_yaml_is_empty_is_refused(tmp_path, capsys):
    run = _run(tmp_path / "R")
    (run / "config.yaml").write_text("")  # read as the defaults: a tiny model, not the run's nano
    line = _error(capsys, "estimate", "--model", str(run))
    assert line == (
        f"lowbit: error: {run / 'config.yaml'}: empty, where a run records all its settings "
        "(model, recipe, data, ...); fix: restore the run's config.yaml from a copy of the run"
    )


def test_the_single_recipe_text_prints_the_estimates_notes(capsys):
    argv = ["estimate", "--model", "nano", "--seq", "16", "--gpus", "2", "--sharding", "fsdp"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    import json

    notes = json.loads(capsys.readouterr().out)["notes"]
    assert notes and all(f"\nnote: {note}\n" in out for note in notes)


def test_unknown_optimizer_names_say_the_fix(capsys):
    line = _error(capsys, "estimate", "--model", "nano", "--optimizer-state", "fp16")
    assert line == (
        "lowbit: error: unknown optimizer state precision 'fp16'; valid optimizer state "
        "precisions: fp32, bf16, fp8, 8bit, 4bit; fix: --optimizer-state fp32 (the default), or "
        "another of those"
    )
    w = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(UsageError, match='; fix: state_precision="fp32" '):
        build_optimizer(w, state_precision="fp16")
    with pytest.raises(UsageError, match=r'adam; fix: name="adamw" \(the default\), or "adam"$'):
        build_optimizer(w, name="sgd")


def test_a_cnn_run_points_to_its_measured_memory(tmp_path, capsys):
    run = _run(tmp_path / "cnn", task="image-classification", model="tiny")
    line = _error(capsys, "estimate", "--model", str(run))
    assert line == (
        f"lowbit: error: {run}: an image-classification run, and the estimator traces "
        "transformers models (causal-lm, token-classification), not its CNN; fix: the memory "
        "table its lowbit train printed (measured at step 2), or measure it again: lowbit train "
        f"--config {run / 'config.yaml'} --steps 2 --out DIR"
    )
