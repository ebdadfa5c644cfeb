"""One-line messages that say what is wrong and what to do instead; defaults a run folder gives."""

import sys

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.infer.io import _check_out


def test_wandb_missing_is_one_warning_line(tmp_path, capsys, monkeypatch):
    """Without the wandb package a --wandb run trains on and says so in lowbit's own words, not
    with a Python warning and its source line."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    argv = ["train", "--model", "nano", "--steps", "1", "--seq-len", "16", "--batch-size", "2"]
    argv += ["--eval-batches", "1", "--wandb", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "wandb" in line]
    assert lines == [
        "lowbit: warning: --wandb: the wandb package is not installed; logging without it "
        "(fix: pip install wandb)"
    ]


def test_a_full_out_folder_names_fixes_that_exist(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"not empty; fix: remove it, choose another --out, or"):
        _check_out(out, force=False)


def test_estimate_of_a_tagger_run_takes_the_runs_task(tmp_path, capsys):
    """The run folder records its task: `lowbit estimate --model RUN` refused a tagger's run with
    "fix: --task token-classification" though nothing else could be meant."""
    from tests.memory.test_hunt_s21 import _tagger_run

    _tagger_run(tmp_path)
    assert main(["estimate", "--model", str(tmp_path)]) == 0
    assert f"model {tmp_path} (token-classification):" in capsys.readouterr().out
    argv = ["estimate", "--model", str(tmp_path), "--task", "causal-lm"]
    assert main(argv) == 2  # a task given against the run's is still refused
    assert "the run's task is token-classification" in capsys.readouterr().err


def test_doctor_takes_trains_switches(tmp_path):
    """`lowbit doctor` takes the options of the `lowbit train` command line it probes: the
    --activation-checkpointing switch was an unrecognized argument."""
    argv = ["doctor", "--model", "nano", "--probe-steps", "1", "--batch-size", "2"]
    argv += ["--seq-len", "16", "--activation-checkpointing", "--out", str(tmp_path / "doctor")]
    assert main(argv) == 0


def test_estimate_of_a_cnn_run_names_the_runs_task(tmp_path, capsys):
    """A CNN's run folder has no estimate: the refusal names the run's task and the memory table
    that run measured (session 36; it named the runs that have an estimate), not an 'unknown
    task' the user never gave."""
    from lowbit.train.config import TrainConfig, write

    write(TrainConfig(task="image-classification"), tmp_path)
    assert main(["estimate", "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{tmp_path}: an image-classification run" in error
    assert "fix: the memory table its lowbit train printed (measured at step 2)" in error


def test_estimate_says_when_a_model_cannot_checkpoint(tmp_path, capsys):
    """ALBERT does not support activation checkpointing (lowbit train refuses the flag): the
    estimate printed figures "with checkpointing" for it all the same."""
    from transformers import AlbertConfig

    AlbertConfig(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ).save_pretrained(tmp_path)
    argv = ["estimate", "--model", str(tmp_path), "--task", "token-classification", "--seq", "32"]
    assert main(argv) == 0
    assert "with: this model does not support activation checkpointing" in capsys.readouterr().out
    for recipes in ("bf16-mixed", "fp32,bf16-mixed"):
        assert main([*argv, "--recipe", recipes, "--activation-checkpointing"]) == 2
        error = capsys.readouterr().err
        assert "does not support activation checkpointing" in error
        assert "fix: drop --activation-checkpointing" in error
