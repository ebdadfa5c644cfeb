"""Session 31: ``lowbit eval --json`` of a tagger carries its entity table's rows; a run that has
saved no checkpoint yet is refused with the command that starts it again (not a fresh default run
in its folder); a task counts its own evaluation batches."""

import json
import re
import shutil

import pytest

from lowbit.cli import main
from lowbit.train.evaluate import load_run

ENTITY_ROW = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)$")  # type, p, r, f1, true


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    """A 2-step tagger whose validation sentences hold PER entities only (no ORG, no LOC)."""
    tmp = tmp_path_factory.mktemp("tagger")
    folder = tmp / "data"
    folder.mkdir()
    train = ["Ann B-PER", "Lee I-PER", "of B-ORG", "EU I-ORG", "in O", "Rome B-LOC", ""] * 8
    dev = ["Ann B-PER", "Lee I-PER", "ran O", ""] * 8
    for name, lines in (("train.txt", train), ("dev.txt", dev), ("test.txt", dev)):
        (folder / name).write_text("\n".join(lines))
    run = tmp / "run"
    argv = ["train", "--task", "token-classification", "--model", "tiny", "--seq-len", "12"]
    argv += ["--batch-size", "4", "--steps", "2", "--data", str(folder)]
    assert main([*argv, "--quiet", "--out", str(run)]) == 0
    return run


def _json(argv, capsys) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_json_of_a_tagger_carries_its_entity_rows(tagger, capsys):
    """The entity-level table (per type) was printed only; the JSON had its ALL row alone."""
    capsys.readouterr()
    assert main(["eval", str(tagger)]) == 0
    table = capsys.readouterr().out.split("entity level:")[1]
    printed = {m[1]: m.groups()[1:] for line in table.splitlines() if (m := ENTITY_ROW.match(line))}
    data = _json(["eval", str(tagger)], capsys)
    rows = data["per_entity_f1"]
    assert set(rows) == {"LOC", "ORG", "PER"} and set(printed) == {*rows, "ALL"}
    for kind, row in rows.items():
        assert set(row) == {"this", "support"}  # the per-label rows' shape
        f1, true = printed[kind][2], int(printed[kind][3])
        assert row["support"] == true
        assert (row["this"] is None) == (f1 == "-")
        assert row["this"] is None or f"{row['this']:.4f}" == f1
    assert rows["LOC"] == rows["ORG"] == {"this": None, "support": 0}  # none in the split
    assert f"{data['entity_f1']:.4f}" == printed["ALL"][2]
    # the number the training summary printed, of the same checkpoint and split (the whole
    # validation split is within the run's --eval-batches)
    logged = [json.loads(line) for line in (tagger / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in logged if row["split"] == "validation"][-1]
    assert final["step"] == data["step"] and final["entity_f1"] == data["entity_f1"]


def test_a_run_without_a_checkpoint_yet_names_its_restart(tagger, tmp_path, capsys):
    """The error's fix, `lowbit train --out RUN`, trained a default causal LM in the tagger's
    folder (a run without a checkpoint may be replaced without --overwrite)."""
    run = tmp_path / "run"
    shutil.copytree(tagger, run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint yet" in err
    assert f"lowbit train --config {run / 'config.yaml'} --out {run}" in err
    assert "every 100 steps" in err


def test_a_task_counts_its_evaluation_batches(digits_run, tagger):
    task = load_run(digits_run).task  # 270 validation images at batch 8
    assert task.eval_batch_count("validation") == 34
    assert task.eval_batch_count("validation", 3) == 3
    assert task.eval_batch_count("validation", 99) == 34
    assert load_run(tagger).task.eval_batch_count("validation") == 2  # 8 sentences at batch 4


def test_a_quantized_taggers_entity_rows_pair_with_its_source(tagger, tmp_path, capsys):
    folder = tmp_path / "int8"
    assert main(["quantize", str(tagger), "--to", "int8", "--out", str(folder)]) == 0
    run = _json(["eval", str(tagger)], capsys)["per_entity_f1"]
    data = _json(["eval", str(folder)], capsys)
    assert set(data["per_entity_f1"]) == set(run) == {"LOC", "ORG", "PER"}
    for kind, row in data["per_entity_f1"].items():
        assert set(row) == {"reference", "this", "support"}
        assert row["support"] == run[kind]["support"]
    assert "per_entity_f1" not in data["baseline"] and "per_label_f1" not in data["baseline"]
