"""Session 30: the per-label tables of ``lowbit eval`` on a classification run, read on a subset
(``--max-batches``) where some classes are missing: integer supports, and a row for every class."""

import re

import pytest

from lowbit.cli import main
from lowbit.data import token_report

ROW = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$")  # label, p, r, f1, support


def _rows(table: str) -> dict[str, list[str]]:
    """``{label: [precision, recall, f1, support]}`` of a printed per-label table."""
    return {m[1]: list(m.groups()[1:]) for line in table.splitlines() if (m := ROW.match(line))}


def test_token_report_prints_integer_supports_and_every_tag():
    """scikit-learn 1.9 printed supports as floats (``1.0``, ``accuracy 2.0``) when no token was
    right, and left out a tag the sentences evaluated neither held nor predicted."""
    text, report = token_report([["B-A", "O"]], [["O", "B-B"]], labels=["O", "B-A", "B-B", "I-A"])
    rows = _rows(text)
    assert rows["B-A"][3] == "1" and rows["B-B"][3] == "0" and rows["O"][3] == "1"
    accuracy = next(line for line in text.splitlines() if "accuracy" in line)
    assert accuracy.split() == ["accuracy", "0.0000", "2"]
    assert rows["I-A"] == ["-", "-", "-", "0"]  # nothing to score, shown as such
    assert "neither present nor predicted" in text
    assert report["I-A"] == {"precision": None, "recall": None, "f1-score": None, "support": 0}
    assert report["B-A"]["support"] == 1 and isinstance(report["B-A"]["support"], int)


def test_token_report_of_present_tags_keeps_scikit_learns_numbers_and_layout():
    from sklearn.metrics import classification_report

    true, pred = ["B-A", "O", "O", "I-A"], ["B-A", "B-A", "O", "I-A"]
    text, report = token_report([true], [pred], labels=["O", "B-A", "I-A"])
    assert text == classification_report(true, pred, digits=4, zero_division=0)
    assert report["macro avg"]["f1-score"] == pytest.approx(7 / 9)


def test_eval_of_a_digits_subset_lists_every_class_with_integer_supports(digits_run, capsys):
    """The first 8 validation images hold no 1 and no 3: their rows were missing, and the
    supports read ``1.0`` when no prediction was right."""
    capsys.readouterr()
    assert main(["eval", str(digits_run), "--max-batches", "1"]) == 0
    table = capsys.readouterr().out.split("per-label:")[1]
    rows = _rows(table)
    assert [str(c) for c in range(10)] == [k for k in rows if k.isdigit()]
    assert rows["1"] == ["-", "-", "-", "0"] and rows["3"] == ["-", "-", "-", "0"]
    assert all(re.fullmatch(r"\d+", row[3]) for row in rows.values())
    weighted = next(line for line in table.splitlines() if "weighted avg" in line)
    assert sum(int(rows[str(c)][3]) for c in range(10)) == 8 == int(weighted.split()[-1])


def _conll(folder):
    """Validation sentences without LOC or ORG: the run's tags (from every split) hold them."""
    folder.mkdir()
    train = ["Ann B-PER", "Lee I-PER", "of B-ORG", "EU I-ORG", "in O", "Rome B-LOC", ""] * 8
    dev = ["Ann B-PER", "Lee I-PER", "ran O", ""] * 8
    for name, lines in (("train.txt", train), ("dev.txt", dev), ("test.txt", dev)):
        (folder / name).write_text("\n".join(lines))
    return folder


def test_eval_of_a_tagger_lists_every_tag_and_entity_type(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--model", "tiny", "--seq-len", "12"]
    argv += ["--batch-size", "4", "--steps", "2", "--data", str(_conll(tmp_path / "data"))]
    assert main([*argv, "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    tokens, entities = out.split("per-label (token level):")[1].split("entity level:")
    rows = _rows(tokens)
    tags = {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC"}
    assert set(rows) == tags  # two steps predict a few of them: the rest were left out
    assert rows["B-LOC"][3] == rows["B-ORG"][3] == "0"
    assert all(re.fullmatch(r"\d+", row[3]) for row in rows.values())
    types = {line.split()[0]: line.split()[1:] for line in entities.splitlines()[2:] if line}
    assert types["LOC"][-1] == types["ORG"][-1] == "0"
    assert types["PER"][-1] == types["ALL"][-1] == "4"  # 4 sentences of one PER each
