"""Session 30: ``lowbit eval --json`` of a classification run carries its per-label table, under
the key a quantized folder's JSON uses; a folder lists every class; each model runs the batches
once."""

import json
import re
import shutil

import pytest

from lowbit.cli import main
from lowbit.infer import load_source
from lowbit.infer.evaluate import fp32_precision
from lowbit.train.tasks import ImageClassificationTask
from tests.once import folder_once_per_session

ROW = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$")  # label, p, r, f1, support
DIGITS = [str(d) for d in range(10)]


def _json(argv, capsys) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _table(argv, capsys, start: str, end: str | None = None) -> dict[str, list[str]]:
    """``{label: [precision, recall, f1, support]}`` of the per-label table ``lowbit eval``
    prints after ``start``."""
    capsys.readouterr()
    assert main(argv) == 0
    table = capsys.readouterr().out.split(start)[1]
    table = table.split(end)[0] if end else table
    return {m[1]: list(m.groups()[1:]) for line in table.splitlines() if (m := ROW.match(line))}


def _f1(cell: str):
    return None if cell == "-" else float(cell)


@pytest.fixture(scope="module")
def quantized(digits_run, tmp_path_factory):
    """`digits_run` quantized to int8, once per session (read only)."""

    def make(folder):
        argv = ["quantize", str(digits_run), "--to", "int8", "--out", str(folder / "int8")]
        assert main(argv) == 0
        return folder / "int8"

    return folder_once_per_session(tmp_path_factory, "eval-json-s30-int8", make)


def test_eval_json_of_a_digits_run_carries_its_per_label_table(digits_run, capsys):
    """The JSON held loss and accuracy only: the table's numbers were in the text alone."""
    argv = ["eval", str(digits_run), "--max-batches", "1"]
    printed = _table(argv, capsys, "per-label:")
    data = _json(argv, capsys)
    per = data["per_label_f1"]
    assert list(per) == DIGITS  # every digit, the 8 images' too few to hold them all
    for digit in DIGITS:
        row = printed[digit]
        assert per[digit]["support"] == int(row[3])
        f1 = per[digit]["this"]
        assert (f1 is None) == (row[2] == "-") and (f1 is None or f"{f1:.4f}" == row[2])
    assert {row["support"] for row in per.values() if row["this"] is None} == {0}
    assert sum(row["support"] for row in per.values()) == 8
    assert 0 <= data["accuracy"] <= 1 and data["loss"] > 0  # the keys there were, unchanged


def test_eval_json_of_a_tagger_carries_every_tags_f1(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    train = ["Ann B-PER", "Lee I-PER", "of B-ORG", "EU I-ORG", "in O", "Rome B-LOC", ""] * 8
    dev = ["Ann B-PER", "Lee I-PER", "ran O", ""] * 8  # no ORG, no LOC
    for name, lines in (("train.txt", train), ("dev.txt", dev), ("test.txt", dev)):
        (folder / name).write_text("\n".join(lines))
    run = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--model", "tiny", "--seq-len", "12"]
    argv += ["--batch-size", "4", "--steps", "2", "--data", str(folder)]
    assert main([*argv, "--quiet", "--out", str(run)]) == 0
    argv = ["eval", str(run), "--max-batches", "1"]
    printed = _table(argv, capsys, "per-label (token level):", "entity level:")
    data = _json(argv, capsys)
    per = data["per_label_f1"]
    assert set(per) == {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC"} == set(printed)
    assert {tag: row["support"] for tag, row in per.items()} == {
        tag: int(row[3]) for tag, row in printed.items()
    }
    assert {tag: row["this"] for tag, row in per.items()} == pytest.approx(
        {tag: _f1(row[2]) for tag, row in printed.items()}, abs=5e-5
    )
    assert {"loss", "accuracy", "entity_f1"} <= set(data)


def test_a_run_and_its_quantized_folder_give_every_class_the_same_keys(
    digits_run, quantized, capsys
):
    """The folder listed only the digits its 8 images held or its models predicted, without a
    support; a script read other keys for a run and for its folder."""
    run = _json(["eval", str(digits_run), "--max-batches", "1"], capsys)["per_label_f1"]
    data = _json(["eval", str(quantized), "--max-batches", "1"], capsys)
    folder = data["per_label_f1"]
    assert sorted(folder) == DIGITS == list(run)
    for digit in DIGITS:
        assert set(folder[digit]) == {"reference", "this", "support"}
        assert set(run[digit]) == {"this", "support"}
        assert folder[digit]["support"] == run[digit]["support"]  # the same 8 images
    untouched = [d for d in DIGITS if folder[d]["this"] is None]
    assert untouched and all(folder[d]["reference"] is None for d in untouched)
    assert all(folder[d]["support"] == 0 for d in untouched)
    assert "baseline" in data and "per_label_f1" not in data["baseline"]
    capsys.readouterr()
    assert main(["eval", str(quantized), "--max-batches", "1"]) == 0
    table = capsys.readouterr().out.split("per-label F1\n")[1].splitlines()[1:]  # past the header
    rows = {line.split()[0]: line.split()[1:] for line in table if not line.startswith("(")}
    assert list(rows) == DIGITS
    assert all(rows[d] == ["-", "-", "-", "0"] for d in untouched)


def test_a_quantized_classifier_is_evaluated_in_one_pass_a_model(quantized, capsys, monkeypatch):
    """`compare` ran each model over the batches twice (metrics, then predictions again)."""
    calls = []
    predict = ImageClassificationTask.predict

    def counted(task, model, *args, **kwargs):
        calls.append(model)
        return predict(task, model, *args, **kwargs)

    data = _json(["eval", str(quantized), "--max-batches", "2"], capsys)
    monkeypatch.setattr(ImageClassificationTask, "predict", counted)
    assert _json(["eval", str(quantized), "--max-batches", "2"], capsys) == data
    assert len(calls) == 2 and calls[0] is not calls[1]  # the folder's model, its reference
    monkeypatch.undo()
    source = load_source(quantized)
    metrics = source.task.evaluate(source.model, fp32_precision(), "validation", 2)
    assert {key: data[key] for key in metrics} == metrics  # the numbers of `Task.evaluate`


def test_a_folder_whose_source_is_gone_still_reports_per_label_f1(digits_run, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(digits_run, source)
    folder = tmp_path / "int8"
    assert main(["quantize", str(source), "--to", "int8", "--out", str(folder)]) == 0
    shutil.rmtree(source)
    data = _json(["eval", str(folder), "--max-batches", "1"], capsys)
    assert "baseline" not in data and sorted(data["per_label_f1"]) == DIGITS
    assert all(set(row) == {"this", "support"} for row in data["per_label_f1"].values())
    capsys.readouterr()
    assert main(["eval", str(folder), "--max-batches", "1"]) == 0
    text = capsys.readouterr().out
    assert "is not there, moved or deleted" in text and "per-label F1" in text
