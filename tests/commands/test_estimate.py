import json

from lowbit.cli import main


def test_estimate_prints_components_and_fits(capsys):
    argv = ["estimate", "--model", "tiny", "--recipe", "bf16-low", "--optimizer-state", "8bit"]
    assert main([*argv, "--batch", "8", "--seq", "128"]) == 0
    out = capsys.readouterr().out
    for label in ("parameters", "gradients", "master weights", "optimizer states", "activations"):
        assert label in out
    assert "temporary copies" in out and "total" in out and "MiB" in out
    assert "activations without checkpointing" in out
    for gib in ("24 GB", "40 GB", "80 GB", "141 GB"):
        assert gib in out
    assert "largest batch" in out


def _config_json(folder, **fields) -> str:
    path = folder / "config.json"
    path.write_text(json.dumps(fields))
    return str(path)


def test_estimate_config_json(tmp_path, capsys):
    config = _config_json(
        tmp_path, model_type="llama", hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, vocab_size=100,
    )  # fmt: skip
    assert main(["estimate", "--model", config, "--seq", "64"]) == 0
    assert "parameters" in capsys.readouterr().out


def test_estimate_takes_a_lowbit_run_folder(tmp_path, capsys):
    """A run folder (config.yaml, no config.json) is estimated as the model it trained."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("task: causal-lm\nmodel: tiny\n")
    outputs = []
    for model in ("tiny", str(tmp_path / "run")):
        assert main(["estimate", "--model", model, "--seq", "64"]) == 0
        outputs.append(capsys.readouterr().out.split("\n", 1)[1])  # after the title line
    assert outputs[0] == outputs[1]


def test_estimate_usage_errors_exit_2(capsys):
    assert main(["estimate", "--model", "tiny", "--optimizer-state", "2bit"]) == 2
    fix = "fix: --optimizer-state fp32"
    assert f"precisions: fp32, bf16, fp8, 8bit, 4bit; {fix}" in capsys.readouterr().err
    assert main(["estimate", "--model", "llama-9b"]) == 2
    assert "model size" in capsys.readouterr().err


def test_estimate_compares_recipes_side_by_side(capsys):
    from lowbit.memory.breakdown import human
    from lowbit.memory.estimate import ACCELERATORS_GIB, RESERVE, estimate, fits

    recipes = ["fp32", "bf16-low", "fp8-tensorwise"]
    argv = ["estimate", "--model", "tiny", "--recipe", ",".join(recipes), "--seq", "128"]
    assert main([*argv, "--batch", "4"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    base = estimate("tiny", "fp32", "fp32", 4, 128).total
    for name in recipes:
        expected = estimate("tiny", name, "fp32", 4, 128)
        row = " ".join(rows[name])
        assert f"{human(expected.total)} {expected.total / base:.2f}x" in row
        largest = [
            fits("tiny", name, "fp32", 128, gib * 2**30 * (1 - RESERVE)) for gib in ACCELERATORS_GIB
        ]
        assert rows[name][-len(ACCELERATORS_GIB) :] == [str(n) for n in largest]
    assert "1.00x" in rows["fp32"]  # the first recipe is the reference


def test_estimate_recipe_list_errors_exit_2(capsys):
    assert main(["estimate", "--model", "tiny", "--recipe", "fp32,nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["estimate", "--model", "tiny", "--recipe", "fp32,fp32"]) == 2
    assert "listed twice" in capsys.readouterr().err


def test_estimate_a_token_classifier(tmp_path, capsys):
    config = _config_json(
        tmp_path, model_type="bert", hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, vocab_size=100, num_labels=9,
    )  # fmt: skip
    argv = ["estimate", "--model", config, "--task", "token-classification", "--seq", "64"]
    assert main(argv) == 0
    assert "(token-classification)" in capsys.readouterr().out
    assert main(["estimate", "--model", "tiny", "--task", "token-classification"]) == 2
    assert "named sizes are causal LMs" in capsys.readouterr().err
    assert main(["estimate", "--model", "tiny", "--task", "vision"]) == 2
    assert "causal-lm, token-classification" in capsys.readouterr().err


def test_estimate_refuses_an_encoder_for_a_causal_lm_as_train_does(tmp_path, capsys):
    config = _config_json(
        tmp_path, model_type="bert", architectures=["BertForMaskedLM"], hidden_size=32,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    assert main(["estimate", "--model", config, "--seq", "64"]) == 2
    assert "is not a causal language model" in capsys.readouterr().err
    argv = ["estimate", "--model", config, "--seq", "64", "--task", "token-classification"]
    assert main(argv) == 0
