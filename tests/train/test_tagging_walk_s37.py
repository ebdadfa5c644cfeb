"""Session 37: a user's walk through fine-tuning a pretrained BERT folder for token classification
on CoNLL data of their own (a tiny config-built folder stands in for MiniLM)."""

import torch

from lowbit.cli import main

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ann", "lee", "ran", "rome", "."]


def _bert_folder(folder, positions: int):
    """A tiny 'pretrained' BERT of ``positions`` positions with a word-piece tokenizer of WORDS."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=positions)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def _conll_folder(folder, train: list[str], dev: list[str]):
    folder.mkdir()
    for name, lines in (("train.txt", train), ("dev.txt", dev), ("test.txt", dev)):
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def _train(tmp_path, model, data, seq_len: int) -> int:
    argv = ["train", "--task", "token-classification", "--model", str(model), "--data", str(data)]
    argv += ["--seq-len", str(seq_len), "--batch-size", "2", "--steps", "1", "--quiet"]
    return main([*argv, "--out", str(tmp_path / f"run-{seq_len}")])


def test_a_sentence_past_the_encoders_positions_is_told_to_be_split(tmp_path, capsys):
    """A sentence longer than the encoder's positions, at --seq-len of all of them, was told "fix:
    raise --seq-len", which the next run refused ("exceeds the encoder's 16 positions")."""
    model = _bert_folder(tmp_path / "bert", positions=16)
    sentence = ["Ann B-PER", "ran O"] * 12 + [""]
    data = _conll_folder(tmp_path / "data", sentence + ["Rome B-LOC", ". O", ""] * 4, sentence)
    assert _train(tmp_path, model, data, seq_len=16) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "--seq-len 16" in line]
    assert warned and all("raise --seq-len" not in line for line in warned), warned
    assert all("split such sentences" in line for line in warned), warned
    # below the encoder's positions, raising --seq-len is still the fix
    assert _train(tmp_path, model, data, seq_len=8) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "--seq-len 8" in line]
    assert warned and all("fix: raise --seq-len" in line for line in warned), warned


IOB2 = ["Ann B-PER", "Lee I-PER", "ran O", "", "Rome B-LOC", ". O", ""]
IOB1 = ["Ann I-PER", "Lee I-PER", "ran O", "", "Rome I-LOC", ". O", ""]


def test_splits_in_other_iob_schemes_are_warned_of(tmp_path, capsys):
    """IOB2 training files beside IOB1 dev files (CoNLL-2003's own scheme) trained without a word:
    entity F1 read both alike, token accuracy and the per-label table counted every entity's
    first word wrong (MiniLM: entity F1 0.95 beside accuracy 0.57)."""
    model = _bert_folder(tmp_path / "bert", positions=16)
    # the dev file's one entity tagged as training tags it leaves it IOB1
    data = _conll_folder(tmp_path / "data", IOB2 * 4, IOB1 * 2 + IOB2[:4])
    assert _train(tmp_path, model, data, seq_len=8) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "(IOB1)" in line]
    assert len(warned) == 1, warned
    assert "validation and test splits open their entities with I- (IOB1)" in warned[0]
    assert "train split with B- (IOB2)" in warned[0] and "fix:" in warned[0]


def test_one_scheme_or_a_slip_is_no_warning(tmp_path, capsys):
    from lowbit.data.conll import Sentence, iob_scheme

    model = _bert_folder(tmp_path / "bert", positions=16)
    data = _conll_folder(tmp_path / "data", IOB1 * 4, IOB1 * 2)
    assert _train(tmp_path, model, data, seq_len=8) == 0
    assert "IOB" not in capsys.readouterr().err
    # B- between two entities of a type is IOB1 too; a file of IOB2 with a slip is IOB2
    assert iob_scheme([Sentence(["a", "b", "c"], ["I-PER", "B-PER", "O"])]) == "IOB1"
    slip = [Sentence(["a", "b", "c"], ["B-PER", "O", "B-LOC"]), Sentence(["d"], ["I-PER"])]
    assert iob_scheme(slip) == "IOB2"
    assert iob_scheme(slip[:1] + slip[1:] * 2) is None
    assert iob_scheme([Sentence(["a", "b"], ["S-PER", "O"])]) is None


def test_the_entity_table_keeps_its_columns_for_a_long_type(tmp_path, capsys):
    """An entity type longer than 11 characters (BioNLP's Gene_or_gene_product) pushed its row's
    numbers out of line with the header's and the other rows' (`lowbit eval`)."""
    model = _bert_folder(tmp_path / "bert", positions=16)
    tagged = ["Ann B-Gene_or_gene_product", "ran O", "", "Rome B-LOC", ". O", ""]
    data = _conll_folder(tmp_path / "data", tagged * 4, tagged * 2)
    assert _train(tmp_path, model, data, seq_len=8) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run-8"), "--quiet"]) == 0
    table = capsys.readouterr().out.split("entity level:\n")[1].splitlines()[:4]
    assert [line.split()[0] for line in table] == ["type", "Gene_or_gene_product", "LOC", "ALL"]
    assert len({len(line) for line in table}) == 1, table  # each cell right-aligned in its column
