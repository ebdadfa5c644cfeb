"""Users' own Hugging Face checkpoint folders: architectures and heads lowbit's named sizes never
build (MPT's position limit, RoBERTa's offset positions, token classifiers saved with a head)."""

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.models import build_model, load_causal_lm, max_positions
from lowbit.models.token_classifier import build_token_classifier

ENCODER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
ENCODER["intermediate_size"] = 64


@pytest.mark.parametrize(
    ("config_class", "fields"),
    [
        ("BloomConfig", {"hidden_size": 32, "n_layer": 1, "n_head": 2}),
        ("Gemma2Config", {**ENCODER, "num_key_value_heads": 1, "head_dim": 16}),
    ],
)
def test_a_config_only_folder_of_an_architecture_without_sdpa_builds(
    tmp_path, config_class, fields
):
    """The SDPA try set its attention implementation in the shared config, so the eager retry
    failed too, reported as 'not a causal language model'."""
    import transformers

    getattr(transformers, config_class)(vocab_size=64, **fields).save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path, seed=1)
    assert type(model).__name__ == config_class.replace("Config", "ForCausalLM")
    assert model.config._attn_implementation == "eager"


def test_mpt_takes_no_sequence_longer_than_its_alibi_table(tmp_path):
    """MPT names its limit max_seq_len (no max_position_embeddings): a longer sequence was a
    broadcasting traceback inside its attention, in training and in generation."""
    from transformers import MptConfig

    MptConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=16, vocab_size=64).save_pretrained(
        tmp_path
    )
    model = load_causal_lm(tmp_path, max_seq_len=16)
    assert max_positions(model) == 16
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(UsageError, match="sequence length 17 exceeds the model's 16 positions"):
        load_causal_lm(tmp_path, max_seq_len=17)


def test_roberta_positions_hold_as_many_tokens_as_the_encoder_takes(tmp_path):
    """RoBERTa's positions start after its padding id: 34 position embeddings hold 32 tokens
    (roberta-base: 514 and 512), and a 33-token batch was an index error in training."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=50, max_position_embeddings=34, pad_token_id=1, **ENCODER)
    RobertaModel(config).save_pretrained(tmp_path)
    model = build_token_classifier(str(tmp_path), ["O", "B-X"], max_seq_len=32)
    with torch.no_grad():
        assert model(input_ids=torch.full((1, 32), 5)).logits.shape == (1, 32, 2)
    with pytest.raises(UsageError, match="sequence length 33 exceeds the encoder's 32 positions"):
        build_token_classifier(str(tmp_path), ["O", "B-X"], max_seq_len=33)


def _saved_tagger(folder, labels):
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(vocab_size=50, num_labels=len(labels), **ENCODER)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(0)
    model = BertForTokenClassification(config).eval()
    torch.nn.init.normal_(model.classifier.bias)  # initialized to zeros: tell the rows apart
    model.save_pretrained(folder)
    return model


def test_a_tagger_with_a_head_of_other_labels_gets_a_fresh_head(tmp_path):
    """A token classifier saved with 3 labels trained on data of 2: transformers refused the
    head of another size (a RuntimeError traceback)."""
    saved = _saved_tagger(tmp_path, ["O", "B-PER", "I-PER"])
    model = build_model("token-classification", str(tmp_path), labels=["O", "B-X"])
    assert model.classifier.out_features == 2 and model.config.id2label == {0: "O", 1: "B-X"}
    encoder = model.bert.embeddings.word_embeddings.weight
    assert torch.equal(encoder, saved.bert.embeddings.word_embeddings.weight)


def test_a_tagger_with_the_same_labels_keeps_its_head_in_the_data_order(tmp_path):
    """lowbit orders the tags O first, then sorted; a NER checkpoint's head of the same tags in
    its own order was loaded row for row, each output scoring another tag than its name."""
    saved = _saved_tagger(tmp_path, ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    labels = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
    model = build_model("token-classification", str(tmp_path), labels=labels)
    rows = [saved.config.label2id[label] for label in labels]
    assert torch.equal(model.classifier.weight, saved.classifier.weight[rows])
    assert torch.equal(model.classifier.bias, saved.classifier.bias[rows])
    assert model.config.id2label == dict(enumerate(labels))


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "return", "(", ")", ":"]
# neither a padding token nor one to pad with (an end-of-text or unknown token, as a decoder's
# tokenizer pads: tests/models/test_run_as_model_s37.py)
NO_PAD = {"pad_token": None, "unk_token": None}


@pytest.mark.parametrize(
    ("vocab_size", "tokens", "message"),
    [
        (len(WORDS), NO_PAD, "the tokenizer has no padding token; fix: set its"),
        (6, {}, "the tokenizer has 10 ids, the encoder's embedding 6; fix: save the encoder's own"),
    ],
)
def test_a_tokenizer_that_cannot_feed_the_encoder_is_refused_in_one_line(
    tmp_path, vocab_size, tokens, message
):
    """Padding without a pad token was transformers' ValueError, and ids past the embedding an
    IndexError, both tracebacks from inside training."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from lowbit.models import load_encoder_tokenizer

    vocab = {w: i for i, w in enumerate(WORDS)}
    BertTokenizerFast(vocab=vocab, **tokens).save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=vocab_size, **ENCODER)).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=message):
        load_encoder_tokenizer(str(tmp_path))
