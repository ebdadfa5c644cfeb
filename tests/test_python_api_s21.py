"""The Python API as a user's own script calls it (session 21): entry points beyond `Precision`."""

import pytest

from lowbit.errors import UsageError


@pytest.fixture(scope="module")
def nano_run(tmp_path_factory):
    """A nano Llama trained one step in bf16-mixed, and its int8 quantization."""
    from lowbit.infer import quantize_run
    from lowbit.train import TrainConfig, Trainer

    folder = tmp_path_factory.mktemp("api")
    text = folder / "text.txt"  # 200 paragraphs: faster to split and tokenize than the stdlib
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(200)))
    run = folder / "run"
    settings = {"steps": 1, "batch_size": 2, "seq_len": 16, "eval_batches": 1, "device": "cpu"}
    trainer = Trainer(
        TrainConfig(model="nano", data=str(text), out=str(run), **settings), quiet=True
    )
    trainer.sample = False  # the closing sample text would take most of the fixture's time
    trainer.fit()
    quantized = quantize_run(run, to="int8", out=run.parent / "run-int8").out
    return run, quantized


def test_load_as_run_refuses_a_training_run(nano_run):
    """`load_as_run` read a training run as an fp32 model with a checkpoint path that does not
    exist, so evaluating it silently ran other numerics than the run's recipe."""
    from lowbit.infer import load_as_run
    from lowbit.train import load_run

    run, quantized = nano_run
    with pytest.raises(UsageError, match=r"a training run.*lowbit\.train\.load_run"):
        load_as_run(run)
    loaded = load_run(run)  # the fix it names: the run with its own recipe and checkpoint
    assert loaded.precision.recipe.name == "bf16-mixed" and loaded.checkpoint.is_file()
    inference = load_as_run(quantized)  # what it is for: a quantize/prune folder
    assert inference.checkpoint.is_file() and inference.step == 1


def test_a_config_made_in_python_is_checked_and_takes_paths(tmp_path):
    """TrainConfig(out=Path(...)) crashed in YAML after set-up (an empty run folder left behind),
    steps="10" gave a raw TypeError, and overrides="lm_head=fp32" was read letter by letter."""
    import pytest

    from lowbit.errors import UsageError
    from lowbit.train import TrainConfig
    from lowbit.train.config import resolve

    config = resolve(TrainConfig(out=tmp_path / "run", steps="10", overrides="lm_head=fp32"))
    assert (config.out, config.steps, config.overrides) == (
        str(tmp_path / "run"),
        10,
        ["lm_head=fp32"],
    )
    with pytest.raises(UsageError, match=r"batch_size must be an integer, got 2\.5"):
        resolve(TrainConfig(batch_size=2.5))
    with pytest.raises(UsageError, match="recipe must be a string"):
        resolve(TrainConfig(recipe=object()))


def test_evaluate_inference_dir_refuses_a_training_run(nano_run):
    """It ended in an AttributeError ('NoneType' has no 'get') for a training run's folder."""
    from lowbit.infer.evaluate import evaluate_inference_dir

    run, quantized = nano_run
    with pytest.raises(UsageError, match=r"a training run.*lowbit\.train\.evaluate_run"):
        evaluate_inference_dir(run)
    metrics, _ = evaluate_inference_dir(quantized, max_batches=1)
    assert metrics["loss"] > 0


def test_a_quantized_model_saves_whole_with_torch_save(nano_run, tmp_path):
    """torch.save(model) of a quantized model failed: its layers held a lambda hook."""
    import torch

    from lowbit.infer import load_as_run

    _, quantized = nano_run
    model = load_as_run(quantized).model
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    ids = torch.randint(0, 257, (1, 8))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_read_stats_of_a_folder_that_is_not_there_is_refused(tmp_path):
    """It returned [] for a typo, as for a run that logged no statistics."""
    from lowbit.diagnostics.stats import read_stats

    with pytest.raises(UsageError, match="no such run folder"):
        read_stats(tmp_path / "typo")
    assert read_stats(tmp_path) == []
