"""Follow-ups of session 23's bug hunt: a checkpoint of another run given to `eval`/`generate`,
`generate --top-k 0` and out-of-range seeds, a truncated weights file in a `--model` folder, and a
compare study refusing DeBERTa v1 under autocast before any run."""

from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.train import TrainConfig, train
from lowbit.train import trainer as trainer_module
from tests.train.test_deberta_s23 import _conll_folder, _deberta_folder

TINY_LM = {"model": "nano", "seq_len": 32, "batch_size": 8, "eval_batches": 1, "steps": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-step runs of the same model, in other recipes and seeds: fp32 and bf16-mixed."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "SAMPLE_TOKENS", 8)
        for name, recipe, seed in (("a", "fp32", 0), ("b", "bf16-mixed", 1)):
            config = TrainConfig(**TINY_LM, recipe=recipe, seed=seed, out=str(folder / name))
            train(config, quiet=True)
    return folder / "a", folder / "b"


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_checkpoint_of_another_run_is_refused_naming_both_runs(runs, capsys, command):
    """Its weights fit the model, but they would be evaluated (or sampled) under this run's
    recipe, in a report that names this run."""
    a, b = runs
    other = b / "checkpoints" / "step-0000001.pt"
    assert main([command, str(a), "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{other}: a checkpoint of another run" in err
    assert f"{b}: recipe 'bf16-mixed', {a}: recipe 'fp32'" in err
    assert f"fix: give a checkpoint of {a}" in err


def test_a_runs_own_checkpoint_by_its_path_is_still_taken(runs, capsys):
    a, _ = runs
    own = a / "checkpoints" / "step-0000001.pt"
    assert main(["eval", str(a), "--checkpoint", str(own), "--max-batches", "1"]) == 0
    assert capsys.readouterr().out.startswith("causal-lm nano, recipe fp32, step-0000001.pt")


def test_generate_top_k_0_samples_among_every_token(runs, capsys):
    """transformers' convention: 0 is no limit (the default 40 could not be turned off)."""
    a, _ = runs
    texts = []
    for k in ("0", "100000", "40"):  # 100000: more than the 257 byte tokens, nothing cut
        assert (
            main(["generate", str(a), "--max-new-tokens", "24", "--seed", "3", "--top-k", k]) == 0
        )
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]  # a barely trained model: the top 40 of 257 differ
    assert main(["generate", str(a), "--top-k", "-1"]) == 2
    assert "--top-k -1 is negative; fix: use 0 (no limit) or more" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [2**64, 2**32, -1])
def test_generate_refuses_a_seed_outside_train_seeds_range_in_one_line(runs, capsys, seed):
    a, _ = runs
    assert main(["generate", str(a), "--seed", str(seed), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"seed must be in [0, 2**32), got {seed}; fix: e.g. --seed 0" in err


@pytest.mark.parametrize("shards", [False, True])
def test_a_truncated_safetensors_file_of_a_model_folder_is_named(tmp_path, capsys, shards):
    """An interrupted copy: safetensors' header check failed in a traceback naming no file."""
    from lowbit.models import build_causal_lm

    folder = tmp_path / "hf"
    model = build_causal_lm("nano", 257)
    model.save_pretrained(folder, **({"max_shard_size": "100KB"} if shards else {}))
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) > 1 if shards else [f.name for f in files] == ["model.safetensors"]
    torn = files[len(files) // 2]
    torn.write_bytes(torn.read_bytes()[:-10])
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{torn}: unreadable weights (" in err
    assert "fix: copy it again, or write the folder again with save_pretrained" in err
    assert not out.exists()


def test_compare_refuses_deberta_v1_under_autocast_before_any_run(tmp_path, capsys, monkeypatch):
    """The refusal came when the first bf16-mixed run built its model, after every fp32 run."""
    monkeypatch.chdir(tmp_path)
    model = _deberta_folder(tmp_path / "deberta", "v1")
    data = _conll_folder(tmp_path / "conll")
    argv = ["compare", "--task", "token-classification", "--model", model, "--data", data]
    argv += ["--recipes", "fp32,bf16-mixed", "--seeds", "1", "--steps", "1", "--out", "study"]
    assert main([*argv, "--batch-size", "8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "recipe bf16-mixed runs under bfloat16 autocast" in err
    assert "fix: a recipe without autocast" in err
    assert not Path("study").exists()


def test_a_compare_study_of_deberta_v1_takes_the_recipes_without_autocast_on_this_device(
    tmp_path,
):
    """fp16-mixed emulates fp16 on a CPU, without autocast: it trains DeBERTa v1 there."""
    from lowbit.report import make_study

    model = _deberta_folder(tmp_path / "deberta", "v1")
    base = {"task": "token-classification", "model": model, "device": "cpu"}
    study = make_study("fp32,bf16-low,fp16-mixed", base, seeds=1, out=tmp_path / "study")
    assert study.recipes == ["fp32", "bf16-low", "fp16-mixed"]
