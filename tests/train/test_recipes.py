"""Every preset recipe trains a few steps of a causal LM and a CNN, and its checkpoint reloads."""

import math

import pytest

import lowbit
from lowbit.train import evaluate_run, train

SETTINGS = {
    "causal-lm": {"seq_len": 16, "batch_size": 2, "eval_batches": 1},
    "image-classification": {"batch_size": 16},
}


@pytest.mark.parametrize("task", list(SETTINGS))
@pytest.mark.parametrize("recipe", lowbit.recipe_names())
def test_recipe_trains_and_reloads(tiny_config, task, recipe):
    config = tiny_config(task, recipe=recipe, steps=2, eval_interval=2, **SETTINGS[task])
    result = train(config, quiet=True)
    assert result.status == "completed" and result.steps == 2
    assert math.isfinite(result.train_loss) and math.isfinite(result.final_metrics["loss"])
    # the checkpoint rebuilds the same numerics: evaluating it again gives the same loss
    metrics, _ = evaluate_run(config.out, max_batches=SETTINGS[task].get("eval_batches"))
    assert metrics["loss"] == result.final_metrics["loss"]


def test_emulated_recipe_warns_on_cpu(tiny_config, capsys):
    train(tiny_config("image-classification", recipe="fp8-tensorwise", steps=1), quiet=True)
    err = capsys.readouterr().err
    assert "lowbit: warning: recipe fp8-tensorwise has no native kernels on the CPU" in err
