"""Session 26's hunt in data loading and tokenizers."""

import pytest

from lowbit.data import Sentence, build_tokenizer, encode_with_tokenizer, load_tokenizer
from lowbit.models import load_encoder_tokenizer
from tests.data.bpe import llama3_bpe

WORDS = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
TAGS = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]


def _llama3_backend():
    """Byte-level BPE after a regex split, with no prefix space: Llama 3's and Qwen2's kind."""
    return llama3_bpe(WORDS), "LlamaConfig"


def _gemma_backend():
    """SentencePiece BPE whose normalizer writes spaces as "▁" and adds no dummy prefix: Gemma's."""
    from tokenizers import Tokenizer, models, normalizers

    pieces = ["<|end_of_text|>", "<|pad|>", "<unk>", "▁", *sorted(set("".join(WORDS)))]
    merged = [("▁", word) for word in WORDS[1:]]  # "▁rejects", ... whole, as in a trained vocab
    for word in WORDS[1:]:
        for end in range(2, len(word) + 1):
            merged.append((word[: end - 1], word[end - 1]))
    merges = []
    for left, right in sorted(set(merged), key=lambda m: len(m[0] + m[1])):
        if left + right not in pieces:
            pieces.append(left + right)
            merges.append((left, right))
    vocab = {piece: i for i, piece in enumerate(pieces)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    return bpe, "GemmaConfig"


@pytest.mark.parametrize("backend", [_llama3_backend, _gemma_backend])
def test_words_after_the_first_keep_their_space_in_llama3_and_gemma_tokenizers(tmp_path, backend):
    """Handed a CoNLL sentence word by word, a Llama 3 / Qwen2 / BLOOM tokenizer (byte-level BPE
    after a regex split, no prefix space) or a Gemma one (no dummy prefix) tokenized each word
    after the first without its space: "rej" "ects" where running text has "Ġrejects", so a
    tagger trained on pieces its encoder never saw in pretraining."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    bpe, config_class = backend()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|end_of_text|>", pad_token="<|pad|>"
    )
    tokenizer.save_pretrained(tmp_path)
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), num_hidden_layers=1)
    config.save_pretrained(tmp_path)
    loaded = load_encoder_tokenizer(str(tmp_path))
    running = loaded(" ".join(WORDS), add_special_tokens=False)["input_ids"]
    label2id = {"O": 0, "B-MISC": 1, "B-ORG": 2}
    encoded = encode_with_tokenizer(loaded, [Sentence(WORDS, TAGS)], label2id, len(running))
    assert encoded["input_ids"][0].tolist() == running  # the ids of the words' running text
    starts = [i for i, label in enumerate(encoded["labels"][0].tolist()) if label != -100]
    assert [encoded["labels"][0, i].item() for i in starts] == [label2id[t] for t in TAGS]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_endoftext_written_in_a_text_is_text_for_both_tokenizers(tmp_path, kind):
    """ "<|endoftext|>" in a user's text was a document boundary for BPE (its special token) but
    13 bytes for the byte tokenizer: a document quoting it was cut in two in one and not the
    other. Boundaries now come from lowbit's own documents only."""
    quoting = 'EOT = "<|endoftext|>"\nprint(EOT)\n'
    texts = ["def f(x):\n    return x\n" * 20, quoting * 5]
    tokenizer = build_tokenizer(kind, texts, 300)
    tokenizer.save(tmp_path)
    for tok in (tokenizer, load_tokenizer(tmp_path)):
        ids = tok.encode(quoting)
        assert tok.eot_id not in ids
        assert tok.decode(ids) == quoting
        joined = tok.encode_documents(["a", quoting]).tolist()
        assert joined == [*tok.encode("a"), tok.eot_id, *ids]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"words": ', "JSONDecodeError"),  # cut short
        ('{"words": ["a", "b"]}', r"no \[PAD\]"),
        ('{"words": "[PAD] [UNK]"}', "not a list of words"),
        ("[1, 2]", "TypeError"),
    ],
)
def test_a_damaged_word_vocabulary_is_named_not_a_traceback(tmp_path, content, problem):
    """A run's vocab.json cut short or edited stopped `lowbit eval` and `--resume` with a
    JSONDecodeError or a KeyError '[PAD]' traceback; the tokenizer folder already said so."""
    from lowbit.data import WordVocab
    from lowbit.errors import UsageError

    path = tmp_path / "vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(
        UsageError,
        match=rf"vocab\.json: the saved word vocabulary is damaged "
        rf"\({problem}\); fix: restore the run's vocab\.json",
    ):
        WordVocab.load(path)


def test_a_file_name_that_is_not_utf8_is_read_and_split_by_its_bytes(tmp_path):
    """A file of a --data folder whose name is not UTF-8 (Latin-1, from an old archive) stopped
    the run with a UnicodeEncodeError traceback when its split was drawn from its name."""
    import hashlib
    import os

    from lowbit.data import load_corpus

    folder = tmp_path / "data"
    folder.mkdir()
    latin = os.fsencode(folder) + b"/caf\xe9.txt"
    with open(latin, "wb") as stream:
        stream.write("café au lait\n".encode())
    (folder / "plain.txt").write_text("plain text\n", encoding="utf-8")
    corpus = load_corpus(str(folder))
    docs = {d.name: d for split in corpus.splits.values() for d in split}
    assert sorted(docs) == ["caf\udce9.txt", "plain.txt"]
    assert docs["caf\udce9.txt"].text == "café au lait\n"
    bucket = int(hashlib.sha1(b"caf\xe9.txt").hexdigest()[:8], 16) % 100  # the module's rule
    split = "train" if bucket < 90 else "validation" if bucket < 95 else "test"
    assert docs["caf\udce9.txt"] in corpus.splits[split]
    assert corpus.fingerprint["total"]["files"] == 2
