"""Session 37: ``lowbit train --task token-classification --model RUN`` (a lowbit run folder, or
a path inside one) said "neither a token-classifier size ... nor a Hugging Face model folder";
it now names the run and the ways to train from it that work, as causal-lm's --model does
(`lowbit.models.pretrained.run_as_model`): `lowbit export` of a causal-lm run, --resume of a
tagger run (which `lowbit export` refuses)."""

import pytest

from lowbit.cli import main
from lowbit.train.config import TrainConfig, resolve, write


def _run(folder, **settings):
    """A run folder as `lowbit train` writes it (its config.yaml)."""
    folder.mkdir(parents=True)
    write(resolve(TrainConfig(out=str(folder), **{"model": "nano", **settings})), folder)
    return folder


def _train_error(capsys, model, out) -> str:
    argv = ["train", "--task", "token-classification", "--model", str(model), "--steps", "1"]
    assert main([*argv, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("inside", ["", "checkpoints/step-0000004.pt", "config.yaml"])
def test_a_causal_lm_run_as_a_taggers_model_says_to_export_it(tmp_path, capsys, inside):
    run = _run(tmp_path / "R")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-0000004.pt").write_bytes(b"\x80\x02 a pickled checkpoint")
    line = _train_error(capsys, run / inside if inside else run, tmp_path / "out")
    if inside:
        assert line == (
            f"lowbit: error: {run / inside}: inside the lowbit run folder {run}, not a model; "
            f"fix: lowbit export {run} --out DIR (its last checkpoint) and train with --model DIR"
        )
    else:  # no --resume: it would go on training the causal LM
        assert line == (
            f"lowbit: error: {run}: not a Hugging Face checkpoint folder (no config.json) but a "
            f"lowbit run or quantized/pruned one; fix: lowbit export it (lowbit export {run} "
            "--out DIR) and train with --model DIR"
        )


def test_a_tagger_run_as_a_taggers_model_says_to_resume_it(tmp_path, capsys):
    run = _run(tmp_path / "T", task="token-classification", model="tiny")
    line = _train_error(capsys, run, tmp_path / "out")
    assert line == (
        f"lowbit: error: {run}: not a Hugging Face checkpoint folder (no config.json) but a "
        "lowbit run or quantized/pruned one; fix: --resume the run"
    )
