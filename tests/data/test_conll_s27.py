"""Session 27: treebank (CoNLL-U) and IOBES files in a CoNLL folder, and where a word's label sits
among its pieces."""

import json

import pytest

from lowbit.data import Sentence, encode_with_tokenizer, entity_f1
from lowbit.data.conll import read_conll_folder
from lowbit.errors import UsageError
from tests.data.bpe import llama3_bpe

CONLLU = (
    "# newdoc id = d1\n"
    "# sent_id = 1\n"
    "# text = Paris isn't far.\n"
    "1\tParis\tParis\tPROPN\tNNP\t_\t4\tnsubj\t_\t_\n"
    "2-3\tisn't\t_\t_\t_\t_\t_\t_\t_\t_\n"
    "2\tis\tbe\tAUX\tVBZ\t_\t4\tcop\t_\t_\n"
    "3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_\n"
    "3.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t4:dep\t_\n"
    "4\tfar\tfar\tADJ\tJJ\t_\t0\troot\t_\tSpaceAfter=No\n"
    "5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_\n"
    "\n"
)


def _treebank_folder(folder, extension=".conllu"):
    folder.mkdir()
    for name in ("train", "dev", "test"):
        (folder / f"{name}{extension}").write_text(CONLLU * 3, encoding="utf-8")
    return folder


@pytest.mark.parametrize("extension", [".conllu", ".conllx"])
def test_a_treebank_folder_is_read_as_words_and_their_upos(tmp_path, extension):
    """``train.conllu`` was taken as training data by name, then refused when read: its last
    column (MISC, ``_``) is no IOB tag. The words are tagged with their UPOS; comments, the
    multiword token ``2-3`` and the empty node ``3.1`` are no words."""
    splits = read_conll_folder(_treebank_folder(tmp_path / "ud", extension))
    assert splits["train"][0] == Sentence(
        ["Paris", "is", "n't", "far", "."], ["PROPN", "AUX", "PART", "ADJ", "PUNCT"]
    )
    assert [len(s) for s in splits.values()] == [3, 3, 3]


def test_lowbit_train_tags_a_conllu_folder_with_upos(tmp_path, capsys):
    """Through the command: a run on a CoNLL-U folder trains with the UPOS tags as its labels,
    (its entity F1 scores each word as a one-token chunk: micro F1)."""
    from lowbit.cli import main

    folder = _treebank_folder(tmp_path / "ud")
    out = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--data", str(folder), "--model", "tiny"]
    assert (
        main(
            [
                *argv,
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    labels = json.loads((out / "labels.json").read_text())
    assert labels == ["O", "ADJ", "AUX", "PART", "PROPN", "PUNCT"]


def test_a_treebank_line_that_is_not_ten_columns_is_named(tmp_path):
    folder = _treebank_folder(tmp_path / "ud")
    (folder / "dev.conllu").write_text("1 Paris Paris PROPN NNP _ 0 root _ _\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"dev.conllu:1: 1 tab-separated columns; fix:"):
        read_conll_folder(folder)


def test_a_treebank_word_without_upos_is_named(tmp_path):
    folder = _treebank_folder(tmp_path / "ud")
    line = "1\tParis\tParis\t_\tNNP\t_\t0\troot\t_\t_\n"
    (folder / "test.conllu").write_text(line, encoding="utf-8")
    with pytest.raises(UsageError, match=r"test.conllu:1: word 'Paris' has no part-of-speech"):
        read_conll_folder(folder)


def test_part_of_speech_tags_score_as_one_token_chunks():
    """A tag with no chunk prefix was no entity at all: entity F1 on a treebank was always 0."""
    true = [["PROPN", "AUX", "ADJ", "PUNCT"]]
    pred = [["PROPN", "VERB", "ADJ", "PUNCT"]]
    scores = entity_f1(true, pred)
    assert (scores["correct"], scores["true"], scores["pred"]) == (3, 4, 4)
    assert scores["f1"] == pytest.approx(0.75)


@pytest.mark.parametrize("extension", [".bioes", ".iobes"])
def test_an_iobes_folder_is_read_and_its_entities_scored(tmp_path, extension):
    """``train.bioes`` was taken by name and then refused at its first ``S-`` tag (and
    ``train.iobes``, the scheme's other name, was no split file)."""
    folder = tmp_path / "bioes"
    folder.mkdir()
    text = "John B-PER\nSmith E-PER\nvisited O\nParis S-LOC\n\n"
    for name in (f"train{extension}", f"dev{extension}", f"test{extension}"):
        (folder / name).write_text(text, encoding="utf-8")
    sentence = read_conll_folder(folder)["train"][0]
    assert sentence.tags == ["B-PER", "E-PER", "O", "S-LOC"]
    assert entity_f1([sentence.tags], [sentence.tags])["true"] == 2


@pytest.mark.parametrize(
    ("tags", "entities"),
    [
        (["B-PER", "E-PER", "S-LOC"], {("PER", 0, 2), ("LOC", 2, 3)}),
        (["S-PER", "S-PER"], {("PER", 0, 1), ("PER", 1, 2)}),  # two people, not one
        (["B-PER", "E-PER", "I-PER"], {("PER", 0, 2), ("PER", 2, 3)}),  # E- ends its chunk
        (["S-PER", "E-PER"], {("PER", 0, 1), ("PER", 1, 2)}),
        (["B-PER", "I-PER", "E-PER", "O"], {("PER", 0, 3)}),
        (["B-PER", "I-PER", "B-PER"], {("PER", 0, 2), ("PER", 2, 3)}),  # IOB as before
    ],
)
def test_iobes_chunks_follow_conlleval(tags, entities):
    """``S-PER S-PER`` read as no entity (and ``E-``/``S-`` were refused when read)."""
    from lowbit.data import entity_spans

    assert entity_spans(tags) == entities


# Llama 3's pre-tokenizer splits a number from the space before it
WORDS = ["EU", "rejects", "1995", "call", "in", "42", "."]
TAGS = ["B-ORG", "O", "B-DATE", "O", "O", "B-NUM", "O"]
LABEL2ID = {"O": 0, "B-ORG": 1, "B-DATE": 2, "B-NUM": 3}


def _llama3_tokenizer():
    """Byte-level BPE after Llama 3's regex split, no prefix space, trained here (offline)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=llama3_bpe(WORDS), eos_token="<|end_of_text|>", pad_token="<|pad|>"
    )


def _llama2_tokenizer():
    """SentencePiece BPE as Llama 2's tokenizer.json has it: "▁" prepended, digits one by one,
    so a number's first piece is a lone "▁"."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<pad>", "▁", *sorted(set("".join(WORDS)))]
    merges = []
    for word in ("▁EU", "▁rejects", "▁call", "▁in", "▁."):
        for end in range(2, len(word) + 1):
            if word[:end] not in pieces:
                pieces.append(word[:end])
                merges.append((word[: end - 1], word[end - 1]))
    bpe = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>")


@pytest.mark.parametrize("build", [_llama3_tokenizer, _llama2_tokenizer])
def test_a_number_is_labelled_on_its_digits_not_on_the_space_before_them(build):
    """Llama 3 splits " 1995" as "Ġ" "199" "5" (Llama 2: "▁" "1" "9" "9" "5"): the label went
    on the lone space piece, whose input is the same for every number and word after it."""
    tokenizer = build()
    encoded = encode_with_tokenizer(tokenizer, [Sentence(WORDS, TAGS)], LABEL2ID, 32)
    ids, labels = encoded["input_ids"][0].tolist(), encoded["labels"][0].tolist()
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert {"Ġ", "▁"} & set(pieces)  # the tokenizer does make a lone space piece
    labelled = [(piece, label) for piece, label in zip(pieces, labels) if label != -100]
    assert [label for _, label in labelled] == [LABEL2ID[t] for t in TAGS]
    assert all(piece.strip("Ġ▁") for piece, _ in labelled)
    assert [piece.strip("Ġ▁") for piece, _ in labelled][2][0] == "1"  # 1995's first digit


def test_a_universal_dependencies_folder_is_read_by_its_own_names(tmp_path):
    """A UD treebank names its splits ``en_ewt-ud-train.conllu``: the folder was refused (no
    split file) until renamed. Its raw text (``en_ewt-ud-train.txt``) is no tagged data."""
    from lowbit.data.conll import conll_folder_files

    folder = tmp_path / "UD_English-EWT"
    folder.mkdir()
    names = ["en_ewt-ud-dev.conllu", "en_ewt-ud-test.conllu", "en_ewt-ud-train.txt", "README.md"]
    names += ["cs_x-ud-train-ca.conllu", "cs_x-ud-train-ct.conllu"]
    for name in names:
        (folder / name).write_text(CONLLU, encoding="utf-8")
    files = conll_folder_files(folder)
    assert {split: [p.name for p in paths] for split, paths in files.items()} == {
        "train": ["cs_x-ud-train-ca.conllu", "cs_x-ud-train-ct.conllu"],
        "validation": ["en_ewt-ud-dev.conllu"],
        "test": ["en_ewt-ud-test.conllu"],
    }
    assert read_conll_folder(folder)["validation"][0].tags[0] == "PROPN"


def test_a_treebank_named_as_plain_conll_is_refused_with_the_name_that_reads_it(tmp_path):
    """A UD file named ``train.conll`` failed on its MISC column with "use O, B-TYPE or I-TYPE",
    a fix that does not apply to a treebank."""
    folder = _treebank_folder(tmp_path / "ud", ".conll")
    words = [line for line in CONLLU.splitlines(keepends=True) if not line.startswith("#")]
    (folder / "train.conll").write_text("".join(words), encoding="utf-8")
    with pytest.raises(UsageError, match=r"train.conll:1: invalid IOB tag '_'; fix: name the file"):
        read_conll_folder(folder)


def test_one_treebank_file_splits_by_its_newdoc_documents(tmp_path):
    """``--data ud.conllu``: ``# newdoc`` marks a treebank's documents as ``-DOCSTART-`` does a
    CoNLL file's, so no document lends sentences to both training and validation."""
    from lowbit.train.tasks import conll_splits

    path = tmp_path / "ud.conllu"
    second = CONLLU.replace("# newdoc id = d1\n", "").replace("\tParis\t", "\tRome\t")
    path.write_text("".join(CONLLU.replace("d1", f"d{i}") + second for i in range(40)), "utf-8")
    splits = conll_splits(str(path))
    assert sum(len(s) for s in splits.values()) == 80
    for sentences in splits.values():  # whole documents: each Paris sentence with its Rome one
        assert [s.tokens[0] for s in sentences] == ["Paris", "Rome"] * (len(sentences) // 2)


@pytest.mark.parametrize("name", ["train.txt", "train.conllu"])
def test_a_file_with_carriage_return_line_ends_is_refused_not_read_as_one_token(tmp_path, name):
    """Old Mac line ends (CR alone) made the whole file one line: read as the token "Paris"
    tagged with the file's last tag, every other word silently lost."""
    from lowbit.data.conll import read_conll

    path = tmp_path / name
    path.write_bytes(b"Paris B-LOC\rLondon B-LOC\r\rBob B-PER\r")
    with pytest.raises(UsageError, match=r"train\.\w+:1: a carriage return inside a line"):
        read_conll(path)


def test_a_treebank_of_too_few_documents_names_its_own_document_marks(tmp_path):
    """The fix for too few documents named CoNLL's -DOCSTART- lines, which a treebank has none
    of: its documents are marked by ``# newdoc`` comments."""
    from lowbit.train.tasks import conll_splits

    path = tmp_path / "ud.conllu"
    path.write_text(CONLLU + CONLLU.replace("d1", "d2"), "utf-8")
    with pytest.raises(UsageError, match=r"or drop the # newdoc lines to split by sentence$"):
        conll_splits(str(path))


def test_a_word_that_spells_a_special_token_is_its_characters_not_the_token():
    """A word "[SEP]" (or "<s>", "[PAD]") in the data was encoded as that special token: a
    separator or padding in the middle of the encoder's input. A word the tokenizer drops still
    becomes the unknown token, not the pieces of "[UNK]" spelled out."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "[", "]", "sep", "pad"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    sentence = Sentence(["a", "[SEP]", "\u200b", "b", "[PAD]"], ["O", "B-X", "B-X", "O", "B-X"])
    enc = encode_with_tokenizer(tokenizer, [sentence], {"O": 0, "B-X": 1}, max_len=16)
    pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    assert pieces[:11] == ["[CLS]", "a", "[", "sep", "]", "[UNK]", "b", "[", "pad", "]", "[SEP]"]
    assert enc["attention_mask"][0].tolist() == [1] * 11 + [0] * 5
    labels = enc["labels"][0].tolist()
    assert [(pieces[i], label) for i, label in enumerate(labels) if label != -100] == [
        ("a", 0), ("[", 1), ("[UNK]", 1), ("b", 0), ("[", 1)
    ]  # fmt: skip
