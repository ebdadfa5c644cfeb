"""A config.json whose sizes cannot make a model (session 43)."""

import json

import pytest

from lowbit.cli import main

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 300,
    "max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_hidden_layers", -1),
        ("num_hidden_layers", 0),
        ("vocab_size", 0),
    ],
)
@pytest.mark.parametrize("command", ["estimate", "train"])
def test_a_size_below_one_is_refused_naming_the_field(tmp_path, capsys, field, value, command):
    """`"num_hidden_layers": -1` (or 0) was estimated silently as a model with no layers, and
    `lowbit train` stopped with transformers' traceback (`__len__() should return >= 0`)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA, field: value}))
    args = [command, "--model", str(folder)]
    if command == "train":
        args += ["--steps", "1", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f'"{field}": {value}' in err and "fix:" in err
    assert not (tmp_path / "run").exists()


def test_a_gpt2_alias_is_named_as_the_file_spells_it(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    fields = {"model_type": "gpt2", "n_embd": 32, "n_layer": 0, "n_head": 4, "vocab_size": 300}
    (folder / "config.json").write_text(json.dumps(fields))
    assert main(["estimate", "--model", str(folder)]) == 2
    assert '"n_layer": 0' in capsys.readouterr().err


def test_a_size_below_one_in_a_text_config_is_refused(tmp_path, capsys):
    """Gemma 3's language model is sized in its ``text_config``: no layers there was estimated
    and trained silently."""
    folder = tmp_path / "gemma3"
    folder.mkdir()
    text = {**LLAMA, "model_type": "gemma3_text", "num_hidden_layers": 0, "head_dim": 8}
    del text["architectures"]
    fields = {"model_type": "gemma3", "text_config": text}
    (folder / "config.json").write_text(json.dumps(fields))
    assert main(["estimate", "--model", str(folder)]) == 2
    assert '"text_config.num_hidden_layers": 0' in capsys.readouterr().err


def test_sizes_that_mean_none_or_no_limit_are_kept(tmp_path, capsys):
    """A Qwen3-MoE config whose every layer has experts sizes no dense MLP: its
    ``intermediate_size`` 0 is no size below one (it was refused, though the model builds)."""
    folder = tmp_path / "moe"
    folder.mkdir()
    fields = {
        "model_type": "qwen3_moe",
        "hidden_size": 32,
        "intermediate_size": 0,
        "moe_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 300,
        "max_position_embeddings": 64,
    }
    (folder / "config.json").write_text(json.dumps(fields))
    assert main(["estimate", "--model", str(folder)]) == 0, capsys.readouterr().err
