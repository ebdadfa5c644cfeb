"""Session 41 (review R4): a config class that refuses None special token ids (ModernBERT's
decoder) was compared as written, with no defaults, so the folder saved again by transformers
read as "config changed" and resume/eval refused it."""

from __future__ import annotations

import json

from lowbit.models.pretrained import model_changes, model_record


def test_a_folder_saved_again_is_unchanged_where_the_config_refuses_none_ids(tmp_path):
    from transformers import AutoConfig

    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=300)
    config = {"model_type": "modernbert-decoder", "num_attention_heads": 4, **fields}
    (tmp_path / "config.json").write_text(json.dumps(config))
    recorded = model_record(tmp_path)
    AutoConfig.from_pretrained(tmp_path).save_pretrained(tmp_path)
    assert model_changes(recorded, tmp_path, tokenizer=False) == []
