"""`lowbit estimate --model RUN` estimates the run that folder holds: its recipe and overrides,
optimizer states, micro-batch, sequence length, processes, sharding and activation checkpointing,
each replaced by the flag that gives it."""

import json

from lowbit.cli import main
from lowbit.memory.estimate import estimate
from lowbit.recipes import get_recipe
from lowbit.train.config import TrainConfig, recipe_of, resolve, write


def _run(folder, **settings) -> TrainConfig:
    """A run folder's config.yaml as `lowbit train` writes it (the resolved settings)."""
    config = resolve(TrainConfig(model="nano", out=str(folder), **settings))
    write(config, folder)
    return config


def _estimate_json(capsys, *argv) -> dict:
    assert main(["estimate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_run_folder_is_estimated_with_its_own_settings(tmp_path, capsys):
    # Until session 32 only the model, task and --seq-len came from the folder: this run was
    # estimated as bf16-mixed with fp32 states, batch 1 and no checkpointing (4.1 MB for 3.6).
    run = _run(
        tmp_path, recipe="fp8-tensorwise", overrides=["lm_head=fp32"], optimizer_state="8bit",
        batch_size=4, seq_len=32, grad_accum=2, activation_checkpointing=True,
    )  # fmt: skip
    out = _estimate_json(capsys, "--model", str(tmp_path))
    planned = estimate(tmp_path, recipe_of(run), "8bit", 4, 32, activation_checkpointing=True)
    assert out["total"] == planned.total
    assert out["optimizer_states"] == planned.optimizer_states
    assert out["activations"] == planned.activations
    settings = out["settings"]
    assert settings["recipe"] == "fp8-tensorwise" and settings["overrides"] == ["lm_head=fp32"]
    assert (settings["optimizer_state"], settings["batch"], settings["seq"]) == ("8bit", 4, 32)
    assert settings["activation_checkpointing"] is True


def test_flags_replace_the_run_folders_settings(tmp_path, capsys):
    _run(
        tmp_path, recipe="fp8-tensorwise", overrides=["lm_head=fp32"], optimizer_state="8bit",
        batch_size=4, seq_len=32, activation_checkpointing=True,
    )  # fmt: skip
    argv = ["--model", str(tmp_path), "--recipe", "bf16-low", "--optimizer-state", "fp32"]
    argv += ["--batch", "2", "--seq", "16", "--no-activation-checkpointing"]
    out = _estimate_json(capsys, *argv, "--override", "model.layers.0.*=fp32")
    planned = estimate(
        tmp_path, get_recipe("bf16-low").with_overrides("model.layers.0.*=fp32"), "fp32", 2, 16
    )
    assert out["total"] == planned.total
    assert out["settings"]["overrides"] == ["model.layers.0.*=fp32"]
    assert out["settings"]["activation_checkpointing"] is False


def test_a_multi_process_run_is_estimated_per_device(tmp_path, capsys):
    # its --batch-size is the global batch: each of its 2 FSDP processes holds half of it
    _run(tmp_path, batch_size=8, seq_len=32, nproc=2, strategy="fsdp")
    out = _estimate_json(capsys, "--model", str(tmp_path))
    assert out == _estimate_json(
        capsys, "--model", "nano", "--batch", "4", "--seq", "32", "--gpus", "2",
        "--sharding", "fsdp",
    ) | {"settings": out["settings"] | {"model": str(tmp_path)}}  # fmt: skip
    assert (out["settings"]["gpus"], out["settings"]["sharding"]) == (2, "fsdp")
    # another device count splits the same global batch, as `lowbit train --nproc 4` would
    assert _estimate_json(capsys, "--model", str(tmp_path), "--gpus", "4")["settings"]["batch"] == 2
    assert main(["estimate", "--model", str(tmp_path), "--gpus", "3"]) == 2
    assert "does not split evenly over 3 GPUs; fix: --batch N" in capsys.readouterr().err
