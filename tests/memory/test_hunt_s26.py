"""Session 26's hunt through `lowbit estimate` and the memory estimator."""

import json

from lowbit.cli import main


def test_estimate_of_a_config_with_a_negative_size_is_one_line(tmp_path, capsys):
    """A config.json whose hidden_size is negative ended `lowbit estimate` (and `lowbit train`'s
    memory check) in a fake-tensor traceback ("Trying to create tensor with negative
    dimension") instead of naming the config."""
    fields = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256}
    fields.update(hidden_size=-64, intermediate_size=128, num_hidden_layers=1)
    fields.update(num_attention_heads=4, max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert main(["estimate", "--model", str(tmp_path), "--seq", "16"]) == 2
    error = capsys.readouterr().err
    assert "transformers cannot build a model from this config" in error
    assert "negative dimension" in error
    assert "fix: correct the config's fields" in error
