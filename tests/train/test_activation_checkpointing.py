"""`lowbit train --activation-checkpointing`: the same numbers in less activation memory."""

import json

import pytest
import torch
import yaml

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.memory import estimate
from lowbit.train import checkpoint as ckpt
from lowbit.train import train
from lowbit.train.config import build_config, load_file
from lowbit.train.trainer import Trainer
from tests.memory_table import memory_rows

NANO = {"model": "nano", "steps": 3, "eval_interval": 3}


def train_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def same_weights(a, b) -> bool:
    a, b = ckpt.load(ckpt.latest(a))["model"], ckpt.load(ckpt.latest(b))["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp8-tensorwise"])
def test_checkpointed_training_is_bit_identical(tiny_config, tmp_path, recipe):
    """The backward recomputes each block's forward instead of keeping what it saved: the same
    values, so the same losses and weights to the bit."""
    plain = train(tiny_config(**NANO, recipe=recipe, out=str(tmp_path / "plain")), quiet=True)
    config = tiny_config(**NANO, recipe=recipe, out=str(tmp_path / "ckpt"))
    config.activation_checkpointing = True
    checkpointed = train(config, quiet=True)
    assert train_losses(tmp_path / "ckpt") == train_losses(tmp_path / "plain")
    assert checkpointed.final_metrics["loss"] == plain.final_metrics["loss"]
    assert same_weights(tmp_path / "plain", tmp_path / "ckpt")
    saved = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    assert saved["activation_checkpointing"] is True


def test_the_cnn_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "image-classification", "--activation-checkpointing"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "image-classification trains a CNN" in err
    assert "fix: drop --activation-checkpointing" in err
    assert not out.exists()


def stop_at_step_2(trainer):
    trainer.stop_requested = trainer.step_idx == 2


@pytest.mark.parametrize("first", [True, False])
def test_a_resumed_run_may_turn_checkpointing_on_or_off(tiny_config, tmp_path, first):
    """It is not a numerics setting: a run resumed with it toggled continues bit for bit."""
    settings = {**NANO, "steps": 4, "save_interval": 2, "eval_interval": 2}
    train(tiny_config(**settings, out=str(tmp_path / "straight")), quiet=True)
    run = tmp_path / "toggled"
    config = tiny_config(**settings, out=str(run))
    config.activation_checkpointing = first
    assert train(config, quiet=True, on_step=stop_at_step_2).status == "interrupted"
    flag = "--no-activation-checkpointing" if first else "--activation-checkpointing"
    assert main(["train", "--resume", str(run), flag, "--quiet"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["activation_checkpointing"] is not first
    assert train_losses(run) == train_losses(tmp_path / "straight")
    assert same_weights(tmp_path / "straight", run)


def test_the_config_file_key(tiny_config, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: nano\nactivation_checkpointing: true\n")
    config = build_config(load_file(path))
    assert config.activation_checkpointing is True
    trainer = Trainer(build_config({**tiny_config().to_dict(), **load_file(path)}), quiet=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules())
    path.write_text("activation-checkpointing: 'yes'\n")
    with pytest.raises(UsageError, match="activation_checkpointing must be true or false"):
        build_config(load_file(path))


def test_the_memory_report_measures_less_activation_memory(tiny_config, tmp_path):
    """The trainer's table puts the checkpointed estimate beside the measured peak (every
    block's input and the block the backward recomputes); for an unconverted recipe the two
    agree to the byte."""
    settings = {**NANO, "steps": 2, "recipe": "bf16-mixed"}
    plain = train(tiny_config(**settings, out=str(tmp_path / "plain")), quiet=True)
    config = tiny_config(**settings, out=str(tmp_path / "ckpt"))
    config.activation_checkpointing = True
    checkpointed = train(config, quiet=True)
    full = memory_rows(plain.extra["memory_table"])
    kept = memory_rows(checkpointed.extra["memory_table"])
    assert kept["activations"][1] < full["activations"][1] / 2
    assert kept["temporary copies"][1] < full["temporary copies"][1]
    assert kept["activations"][0] == kept["activations"][1]
    assert kept["temporary copies"][0] == kept["temporary copies"][1]


def test_compare_passes_the_flag_to_its_runs(tmp_path):
    out = tmp_path / "study"
    argv = ["compare", "--recipes", "fp32", "--seeds", "1", "--model", "nano", "--steps", "1"]
    argv += ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--no-plots"]
    assert main([*argv, "--activation-checkpointing", "--out", str(out), "--quiet"]) == 0
    run = out / "runs" / "fp32" / "seed-0"
    assert yaml.safe_load((run / "config.yaml").read_text())["activation_checkpointing"] is True
    # the report's memory is the checkpointed peak, which the estimate gives to the byte here
    results = json.loads((out / "report" / "results.json").read_text())
    measured = results["recipes"]["fp32"]["memory_bytes"]["activations"]
    assert (
        measured
        == estimate("nano", "fp32", batch=4, seq=32, activation_checkpointing=True).activations
    )


def test_an_encoder_is_told_it_caches_nothing(capfd):
    """BERT's config says use_cache=True; with checkpointing on, transformers printed an
    "incompatible with gradient checkpointing" line at the first training forward, --quiet or
    not. An encoder (no generation) is set not to cache; a causal LM keeps its setting."""
    from lowbit.models import build_causal_lm, build_token_classifier
    from lowbit.train.trainer import enable_activation_checkpointing

    tagger = build_token_classifier("tiny", ["O", "B-X", "I-X"], vocab_size=64)
    tagger.config.use_cache = True
    enable_activation_checkpointing(tagger, "tiny")
    assert tagger.config.use_cache is False
    tagger.train()(torch.randint(0, 64, (2, 8))).logits.sum().backward()
    assert "use_cache" not in capfd.readouterr().err
    causal = build_causal_lm("nano", 257, seed=0)
    before = causal.config.use_cache
    enable_activation_checkpointing(causal, "nano")
    assert causal.config.use_cache == before


@pytest.mark.parametrize("checkpointing", [False, True])
def test_int8s_kept_input_casts_are_estimated_to_the_byte(tiny_config, tmp_path, checkpointing):
    """int8 keeps one bf16 cast of each fp32 input for its layers' weight gradients (q, k and v
    share one); the estimate models the same, so the trainer's two columns agree."""
    config = tiny_config(**{**NANO, "steps": 2}, recipe="int8", out=str(tmp_path / "run"))
    config.activation_checkpointing = checkpointing
    rows = memory_rows(train(config, quiet=True).extra["memory_table"])
    assert rows["activations"][0] == rows["activations"][1]
