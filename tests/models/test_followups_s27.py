"""Session 27: configs transformers cannot build a model from, met by `lowbit train` and
`lowbit estimate` (a folder of a config.json alone: a fresh model)."""

import json

import pytest

from lowbit.cli import main

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 257}
LLAMA |= {"hidden_size": 32, "intermediate_size": 88, "num_hidden_layers": 1}
LLAMA |= {"num_attention_heads": 2, "max_position_embeddings": 64}


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"hidden_size": -32}, "RuntimeError: Trying to create tensor with negative dimension"),
        ({"head_dim": 0}, "ZeroDivisionError"),
    ],
)
@pytest.mark.parametrize("command", ["train", "estimate"])
def test_a_config_no_model_can_be_built_from_is_one_line(tmp_path, capsys, command, fields, names):
    """A negative size passed the memory pre-flight (which refused it quietly) and ended `lowbit
    train` in transformers' traceback; a head_dim of 0 ended both commands in one."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA | fields))
    argv = ["--model", str(tmp_path)]
    if command == "train":
        argv += ["--steps", "1", "--seq-len", "16", "--quiet", "--out", str(tmp_path / "run")]
    assert main([command, *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert error.startswith(f"lowbit: error: {tmp_path}")
    assert "transformers cannot build a model from this config" in error
    assert names in error
    assert error.endswith("fix: correct the config's fields")
    assert not (tmp_path / "run").exists()
