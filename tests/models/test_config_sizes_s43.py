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
        ("num_attention_heads", -4),
        ("hidden_size", 0),
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
