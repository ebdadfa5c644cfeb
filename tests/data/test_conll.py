import pytest
import torch

from lowbit.data.conll import aligned_tags, entity_f1, entity_spans, read_conll, token_report
from lowbit.errors import UsageError

GOOD = """-DOCSTART- -X- O O

EU NNP B-ORG
rejects VBZ O
German\tJJ\tB-MISC

Peter NNP B-PER
Blackburn NNP I-PER
"""


def test_read_conll_takes_first_and_last_columns(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(GOOD)
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [("lonely", "one column 'lonely'"), ("Paris NNP X-LOC", "invalid IOB tag 'X-LOC'"),
     ("Paris B-", "invalid IOB tag 'B-'")],
)  # fmt: skip
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "dev.txt"
    path.write_text(GOOD + "\n" + bad_line + "\n")
    with pytest.raises(UsageError, match=rf"dev\.txt:10: {message}.*fix:"):
        read_conll(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UsageError, match="no such CoNLL file"):
        read_conll(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n-DOCSTART- O\n\n")
    with pytest.raises(UsageError, match="no sentences"):
        read_conll(tmp_path / "empty.txt")


def test_entity_spans_follow_conlleval_chunk_rules():
    tags = ["B-A", "I-A", "O", "I-B", "I-B", "B-B", "I-A", "B-A", "B-A"]
    assert entity_spans(tags) == {
        ("A", 0, 2),  # B- then I- of the same type
        ("B", 3, 5),  # I- after O starts a chunk
        ("B", 5, 6),  # B- ends the previous chunk even of the same type
        ("A", 6, 7),  # I- of another type starts a chunk
        ("A", 7, 8),
        ("A", 8, 9),
    }


def test_entity_f1_hand_computed():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-LOC"]]
    # true entities: PER(0-2) LOC(3) ORG; predicted: PER(0-1) LOC(3) ORG LOC(s2) -> 2 correct
    scores = entity_f1(true, pred)
    assert (scores["true"], scores["pred"], scores["correct"]) == (3, 4, 2)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert scores["per_type"]["PER"]["f1"] == 0.0
    assert scores["per_type"]["LOC"]["precision"] == pytest.approx(0.5)
    assert scores["per_type"]["ORG"]["f1"] == 1.0


def test_entity_f1_edge_cases():
    assert entity_f1([["O", "O"]], [["O", "O"]])["f1"] == 0.0
    assert entity_f1([["B-X"]], [["B-X"]])["f1"] == 1.0
    # an entity cut by a sentence boundary is two entities, not one
    assert entity_f1([["I-X"], ["I-X"]], [["B-X"], ["B-X"]])["f1"] == 1.0
    with pytest.raises(ValueError):
        entity_f1([["O"]], [["O", "O"]])


def test_token_report_text_and_dict():
    text, report = token_report([["B-A", "O", "O"]], [["B-A", "B-A", "O"]])
    assert "B-A" in text
    assert report["B-A"]["precision"] == pytest.approx(0.5)
    assert report["O"]["recall"] == pytest.approx(0.5)


def test_aligned_tags_drop_ignored_positions():
    id2label = {0: "O", 1: "B-X"}
    labels = torch.tensor([[-100, 1, -100, 0, -100]])
    preds = torch.tensor([[1, 1, 0, 1, 1]])
    assert aligned_tags(labels, preds, id2label) == ([["B-X", "O"]], [["B-X", "B-X"]])


def test_non_utf8_file_is_a_one_line_error_and_a_bom_is_not_a_token(tmp_path):
    latin = tmp_path / "dev.txt"
    latin.write_bytes(b"EU B-ORG\n\ncaf\xe9 O\n")
    with pytest.raises(
        UsageError,
        match=r"dev\.txt: not UTF-8 text \(byte 0xe9 at offset 13, line 3\); fix: convert",
    ):
        read_conll(latin)
    bom = tmp_path / "train.txt"
    bom.write_bytes(b"\xef\xbb\xbfEU B-ORG\n")  # as Windows editors save "UTF-8"
    assert read_conll(bom) == [(["EU"], ["B-ORG"])]


def test_columns_are_split_at_spaces_and_tabs_only(tmp_path):
    """Other Unicode whitespace is part of a token: a number with a no-break space, an
    ideographic space token (CJK text)."""
    path = tmp_path / "train.txt"
    path.write_text("10\u00a0000 NUM O\n\u3000\tO\nTokyo B-LOC\r\n\n")
    assert read_conll(path) == [(["10\u00a0000", "\u3000", "Tokyo"], ["O", "O", "B-LOC"])]
