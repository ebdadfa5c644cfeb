"""Session 37: a tagger's sentences are padded after their words, whatever side the tokenizer was
saved with (a decoder's, Llama's, pads before them for generation, which moved each sentence to
other positions than its words alone give)."""

from transformers import BertConfig, BertModel, BertTokenizerFast

from lowbit.data import Sentence, encode_with_tokenizer
from lowbit.models.token_classifier import load_encoder_tokenizer

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ann", "lee", "ran"]


def test_sentences_are_padded_after_their_words(tmp_path):
    vocab = {w: i for i, w in enumerate(WORDS)}
    BertTokenizerFast(vocab=vocab, padding_side="left").save_pretrained(tmp_path)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16)  # fmt: skip
    BertModel(config).save_pretrained(tmp_path)
    loaded = load_encoder_tokenizer(str(tmp_path))
    short = Sentence(tokens=["Ann"], tags=["B-PER"])
    long = Sentence(tokens=["Ann", "Lee", "ran"], tags=["B-PER", "I-PER", "O"])
    labels = {"O": 0, "B-PER": 1, "I-PER": 2}
    encoded = encode_with_tokenizer(loaded, [short, long], labels, max_len=8)
    assert encoded["input_ids"][0].tolist()[:3] == [2, 5, 3]  # [CLS] ann [SEP], then padding
    assert encoded["attention_mask"][0].tolist()[:3] == [1, 1, 1]
    assert encoded["labels"][0].tolist()[1] == 1
