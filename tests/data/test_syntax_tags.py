import pytest

from lowbit.data.conll import Sentence, entity_f1
from lowbit.data.corpus import split_of
from lowbit.data.syntax_tags import (
    IGNORE_INDEX,
    LABELS,
    WordVocab,
    pack_sentences,
    syntax_tag_task,
    tag_source,
)


def tags_of(source):
    """(token, tag) pairs of all logical lines."""
    return [pair for s in tag_source(source) for pair in zip(s.tokens, s.tags)]


def test_roles_on_a_small_function():
    pairs = tags_of("def f(a):\n    b = a.x()\n    return b.y\n")
    assert pairs == [
        ("def", "B-KEYWORD"), ("f", "B-DEF"), ("(", "O"), ("a", "B-PARAM"), (")", "O"),
        (":", "O"),
        ("b", "B-STORE"), ("=", "O"), ("a", "B-LOAD"), (".", "O"), ("x", "B-CALL"), ("(", "O"),
        (")", "O"),
        ("return", "B-KEYWORD"), ("b", "B-LOAD"), (".", "O"), ("y", "B-ATTR"),
    ]  # fmt: skip


def test_same_name_gets_different_roles_by_context():
    pairs = tags_of("n = 1\nn(n, n=2)\nclass n: pass\nimport n\nfor n in n: del n\n")
    assert [tag for token, tag in pairs if token == "n"] == [
        "B-STORE", "B-CALL", "B-LOAD", "B-PARAM", "B-DEF", "B-STORE", "B-STORE", "B-LOAD",
        "B-STORE",
    ]  # fmt: skip


def test_literals_keywords_and_concatenated_strings():
    pairs = tags_of('x = ("a" \'b\', 0x1F, None, "c")\n')
    assert pairs == [
        ("x", "B-STORE"), ("=", "O"), ("(", "O"), ('"a"', "B-STRING"), ("'b'", "I-STRING"),
        (",", "O"), ("0x1F", "B-NUMBER"), (",", "O"), ("None", "B-KEYWORD"), (",", "O"),
        ('"c"', "B-STRING"), (")", "O"),
    ]  # fmt: skip


def test_binding_forms_and_non_ascii_columns():
    source = (
        "import os.path as p\n"
        "try:\n    pass\nexcept E as err:\n    pass\n"
        "match v:\n    case [q, *rest]:\n        pass\n"
        's = "é"; é = s.upper\n'
        "g = lambda u: u\n"
    )
    tags = dict(tags_of(source))
    assert tags["p"] == tags["err"] == tags["q"] == tags["rest"] == "B-STORE"
    assert tags["os"] == "O"
    assert tags["match"] == tags["case"] == "B-KEYWORD"
    assert tags["é"] == "B-STORE"  # ast byte columns were converted to characters
    assert tags["upper"] == "B-ATTR"
    assert tags["u"] == "B-LOAD" and ("u", "B-PARAM") in tags_of(source)


def test_every_tag_is_a_known_label_and_comments_are_dropped():
    pairs = tags_of("x = 1  # comment\n\n\nif x:\n    y = [\n        x,\n    ]\n")
    assert all(tag in LABELS for _, tag in pairs)
    assert [t for t, _ in pairs] == ["x", "=", "1", "if", "x", ":", "y", "=", "[", "x", ",", "]"]
    assert len(tag_source("x = 1  # comment\n\n\nif x:\n    y = [\n        x,\n    ]\n")) == 3


def test_pack_sentences_keeps_lines_whole_and_cuts_long_ones():
    lines = [Sentence(["a"] * 3, ["O"] * 3), Sentence(["b"] * 3, ["O"] * 3),
             Sentence(["c"] * 5, ["B-STRING"] + ["I-STRING"] * 4)]  # fmt: skip
    packed = pack_sentences(lines, window=4)
    assert [s.tokens for s in packed] == [["a"] * 3, ["b"] * 3, ["c"] * 4, ["c"]]
    assert packed[3].tags == ["B-STRING"]  # a cut entity restarts with B-


def test_task_is_deterministic_split_by_file_and_uses_all_labels():
    task = syntax_tag_task(max_files=8, max_eval_files=3, window=32)
    again = syntax_tag_task(max_files=8, max_eval_files=3, window=32)
    assert task == again
    assert all(task[split] for split in ("train", "validation", "test"))
    assert all(len(s.tokens) <= 32 for split in task.values() for s in split)
    used = {tag for s in task["train"] for tag in s.tags}
    assert used == set(LABELS)
    assert split_of("json/decoder.py") in ("train", "validation", "test")


def test_word_vocab_encode_and_round_trip(tmp_path):
    train = [Sentence(["def", "f", "(", ")", ":"], ["B-KEYWORD", "B-DEF", "O", "O", "O"])]
    vocab = WordVocab.build(train, max_size=20)
    label2id = {label: i for i, label in enumerate(LABELS)}
    test = [Sentence(["def", "zz", "9", "'s'", "@"], ["B-KEYWORD", "B-DEF", "B-NUMBER", "B-STRING",
                                                    "O"])]  # fmt: skip
    enc = vocab.encode(test, label2id, max_len=6)
    ids = enc["input_ids"][0].tolist()
    assert [vocab.words[i] for i in ids] == [
        "[CLS]", "def", "[UNK-NAME]", "[UNK-NUM]", "[UNK-STR]", "[SEP]"
    ]  # fmt: skip
    assert enc["labels"][0].tolist() == [IGNORE_INDEX, label2id["B-KEYWORD"], label2id["B-DEF"],
                                         label2id["B-NUMBER"], label2id["B-STRING"], IGNORE_INDEX]  # fmt: skip
    short = vocab.encode(train, label2id, max_len=10)
    assert short["attention_mask"][0].tolist() == [1] * 7 + [0] * 3
    assert short["labels"][0, 7:].tolist() == [IGNORE_INDEX] * 3
    vocab.save(tmp_path / "vocab.json")
    assert WordVocab.load(tmp_path / "vocab.json").words == vocab.words


@pytest.mark.parametrize("name", ["f", "(", "[PAD]"])
def test_word_vocab_specials_first_and_frequent_words_kept(name):
    vocab = WordVocab.build([Sentence(["f", "(", "f"], ["O"] * 3)])
    assert vocab.words[: len(WordVocab.SPECIALS)] == list(WordVocab.SPECIALS)
    assert name in vocab.ids
    assert vocab.pad_id == 0


def test_perfect_predictions_score_one():
    task = syntax_tag_task(max_files=1, max_eval_files=1)
    tags = [s.tags for s in task["validation"]]
    assert entity_f1(tags, tags)["f1"] == 1.0


def test_a_word_the_pretrained_tokenizer_drops_keeps_its_label():
    """A CoNLL token of a zero-width or ideographic space gives no word piece: it is read as the
    tokenizer's unknown token, so its tag still counts (not a sentence cut by the length)."""
    from transformers import BertTokenizerFast

    from lowbit.data.syntax_tags import encode_with_tokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    sentence = Sentence(["a", "\u200b", "b", "\u3000"], ["O", "B-X", "O", "B-X"])
    enc = encode_with_tokenizer(tokenizer, [sentence], {"O": 0, "B-X": 1}, max_len=8)
    assert enc["input_ids"][0].tolist() == [2, 4, 1, 5, 1, 3, 0, 0]
    assert enc["labels"][0].tolist() == [IGNORE_INDEX, 0, 1, 0, 1] + [IGNORE_INDEX] * 3
