"""Session 25's hunt in the built-in models and the loading of users' checkpoint folders."""

import pytest

from lowbit.data import Sentence, encode_with_tokenizer
from lowbit.models import load_encoder_tokenizer

ENCODER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
ENCODER["intermediate_size"] = 64


def _roberta_tokenizer():
    """A small byte-level BPE tokenizer of RoBERTa's kind (no prefix space of its own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        special_tokens=specials, initial_alphabet=alphabet, vocab_size=320
    )
    bpe.train_from_iterator(["def return self class import lambda " * 20], trainer)
    roles = {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>"}
    return RobertaTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", **roles)


@pytest.mark.parametrize(
    ("config_class", "model_class"),
    [
        ("RobertaPreLayerNormConfig", "RobertaPreLayerNormModel"),
        ("Data2VecTextConfig", "Data2VecTextModel"),
    ],
)
def test_roberta_kin_taggers_see_each_word_with_its_leading_space(
    tmp_path, config_class, model_class
):
    """Only the model types gpt2, roberta, deberta and bloom got the prefix space: an encoder of
    another type with RoBERTa's tokenizer saw each pre-split word without its space ("ret" "urn"
    instead of "Ġreturn"), pieces it never met in pretraining, and trained on them silently."""
    import transformers

    tokenizer = _roberta_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **ENCODER)
    getattr(transformers, model_class)(config).save_pretrained(tmp_path)
    loaded = load_encoder_tokenizer(str(tmp_path))
    sentence = Sentence(["return", "self", "lambda"], ["O", "B-X", "O"])
    encoded = encode_with_tokenizer(loaded, [sentence], {"O": 0, "B-X": 1}, max_len=5)
    pieces = loaded.convert_ids_to_tokens(encoded["input_ids"][0])
    assert pieces == ["<s>", "Ġreturn", "Ġself", "Ġlambda", "</s>"]
    assert encoded["labels"][0].tolist() == [-100, 0, 1, 0, -100]
