"""Session 43: a token classifier loads its encoder with ``ignore_mismatched_sizes`` (so that a
saved head of other labels is replaced), which drew every encoder weight of another shape afresh:
a BERT folder whose config.json had ``hidden_size`` edited trained the encoder from random values
under a one-line warning. Now refused in one line naming a weight; an encoder saved without a
head (``BertModel``) still fine-tunes with a new one, without a word."""

from __future__ import annotations

import json

import pytest

from lowbit.cli import main

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Anna", "lives", "in", "Rome", "."]
TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--quiet"]


@pytest.fixture
def encoder(tmp_path):
    """A BertModel folder (no head) with its tokenizer, and CoNLL data of its words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path / "bert"
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(vocab={word: i for i, word in enumerate(WORDS)}).save_pretrained(folder)
    data = tmp_path / "conll"
    data.mkdir()
    sentence = ["Anna B-PER", "lives O", "in O", "Rome B-LOC", ". O", ""]
    for split in ("train", "validation", "test"):
        (data / f"{split}.txt").write_text("\n".join(sentence * 4))
    return folder


def _tag(folder, capsys) -> tuple[int, str]:
    capsys.readouterr()
    data, out = folder.parent / "conll", folder.parent / "run"
    argv = ["train", "--task", "token-classification", "--data", str(data), "--model", str(folder)]
    code = main([*argv, *TRAIN, "--out", str(out)])
    return code, capsys.readouterr().err


def test_an_encoder_without_a_head_fine_tunes_with_a_new_one_untold(encoder, capsys):
    code, err = _tag(encoder, capsys)
    assert code == 0, err
    assert "warning" not in err and "classifier" not in err, err
    assert (encoder.parent / "run").is_dir()


def test_a_config_of_another_hidden_size_is_refused_naming_a_weight(encoder, capsys):
    config = json.loads((encoder / "config.json").read_text())
    config["hidden_size"] = 32
    (encoder / "config.json").write_text(json.dumps(config))
    code, err = _tag(encoder, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "warning" not in err and "Traceback" not in err, err
    assert err.startswith(f"lowbit: error: {encoder / 'config.json'}: does not fit"), err
    # the first encoder weight by name, its shape in the file and in the config's model
    assert "bert.embeddings.LayerNorm.bias is [16] in the weights, [32] in the config's" in err
    assert "fix: restore the config.json saved with these weights" in err, err
    assert not (encoder.parent / "run").exists()
