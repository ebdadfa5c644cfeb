"""Fine-tuning pretrained weights (a local Hugging Face BERT folder, as MiniLM ships) in every
recipe: transfer is exercised under each preset, not only training from scratch."""

import math

import pytest
import torch

import lowbit
from lowbit.train import train

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "return", "self", "(", ")", ":", "="]


def save_tiny_bert(folder, words: list[str]):
    """A tiny 'pretrained' BERT folder with its own word-piece tokenizer of ``words``
    (save_pretrained layout)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("pretrained-bert"), WORDS)


@pytest.fixture(scope="module")
def encode_once():
    """Encode the syntax-tag splits with the pretrained tokenizer once per module: the encoding
    (~2 s, every train sentence) does not depend on the recipe, and training only reads it."""
    from lowbit.train import tasks

    encode, done = tasks._encode_pretrained, {}

    def memo(tokenizer, sentences, label2id, config):
        key = (id(sentences), tuple(label2id.items()), config.seq_len, config.model)
        if key not in done:
            done[key] = (sentences, encode(tokenizer, sentences, label2id, config))
        return done[key][1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks, "_encode_pretrained", memo)
        yield


@pytest.mark.parametrize("recipe", lowbit.recipe_names())
def test_pretrained_encoder_fine_tunes_in_every_recipe(
    tiny_config, pretrained_bert, encode_once, recipe
):
    config = tiny_config(
        "token-classification", model=str(pretrained_bert), recipe=recipe, steps=2, eval_interval=2
    )
    result = train(config, quiet=True)
    assert result.status == "completed"
    assert math.isfinite(result.final_metrics["loss"])
    assert "accuracy" in result.final_metrics
