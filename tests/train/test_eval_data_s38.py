"""Session 38: `lowbit eval RUN --data PATH` evaluates a trained run on new data (a tagger on a
CoNLL file or folder, a causal LM on a text file), with the run's vocabulary, tags and --seq-len,
writing nothing into the run; the digits CNN has no --data. A tagger run quantizes without its
CoNLL data (labels.json and vocab.json are in the run); entity F1 of sentences without entities
is n/a (null), not 0.0, where none is predicted either (else 0.0; NaN for a NaN loss); a folder
given as data needs only the split evaluated; a missing folder's fix names the quantized/pruned folders too."""

import json

import pytest

from lowbit.cli import main
from tests.train.test_eval_metrics_s32 import diverge_classifier

TAGGED = ["Ann B-PER", "Lee I-PER", "ran O", ""] * 8
ONLY_O = ["it O", "ran O", ""] * 4
TAGGER = ["train", "--task", "token-classification", "--model", "tiny", "--seq-len", "12"]
TAGGER += ["--batch-size", "4", "--steps", "1", "--quiet"]


def _tagger(tmp_path, dev=TAGGED, name="run", others=TAGGED):
    """A run trained on ``others`` (its train and test files) and validated on ``dev``."""
    data = tmp_path / f"{name}-data"
    data.mkdir()
    for split, lines in (("train.txt", others), ("dev.txt", dev), ("test.txt", others)):
        (data / split).write_text("\n".join(lines))
    run = tmp_path / name
    assert main([*TAGGER, "--data", str(data), "--out", str(run)]) == 0
    return run, data


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    """A tagger run (read only: the tests that move its data train their own)."""
    return _tagger(tmp_path_factory.mktemp("eval-data"))[0]


def _files(folder) -> dict:
    return {
        str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def test_a_tagger_is_evaluated_on_a_whole_new_file(tagger, tmp_path, capsys):
    """Every sentence of the file (3, not the 5% a file's validation split would hold); a tag
    the run never trained with is warned of and its words count as errors; words it never saw
    are unknown; the --json line names the data, and no split of it."""
    new = tmp_path / "new.txt"
    new.write_text("\n".join(["Bob B-PER", "visited O", "Rome B-LOC", ""] * 3))
    before = _files(tagger)
    capsys.readouterr()
    assert main(["eval", str(tagger), "--data", str(new), "--json", "--quiet"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out)
    assert metrics["data"] == str(new) and metrics["split"] is None
    assert metrics["per_entity_f1"]["LOC"] == {"this": 0.0, "support": 3}
    assert metrics["per_label_f1"]["B-LOC"]["support"] == 3  # every B-LOC word of the file
    assert metrics["per_entity_f1"]["PER"]["support"] == 3
    assert "1 tag of the file never occurs in training (B-LOC)" in err
    assert _files(tagger) == before  # nothing of the run written
    assert main(["eval", str(tagger), "--data", str(new), "--quiet"]) == 0
    assert f"(step 1), {new} (whole file)" in capsys.readouterr().out.splitlines()[0]


def test_a_folder_given_as_data_is_evaluated_on_its_split(tagger, tmp_path, capsys):
    folder = tmp_path / "new"
    folder.mkdir()
    for split, count in (("train", 1), ("dev", 2), ("test", 5)):
        (folder / f"{split}.txt").write_text("\n".join(["Bob B-PER", "sat O", ""] * count))
    capsys.readouterr()
    argv = ["eval", str(tagger), "--data", str(folder), "--json", "--quiet", "--split", "test"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "test" and metrics["data"] == str(folder)
    assert metrics["per_entity_f1"]["PER"]["support"] == 5


def test_a_folder_given_as_data_needs_only_the_split_evaluated(tagger, tmp_path, capsys):
    """A folder of dev.txt and test.txt failed "no train file"; one without the split's file
    says so in one line."""
    folder = tmp_path / "held-out"
    folder.mkdir()
    for split, count in (("dev", 2), ("test", 3)):
        (folder / f"{split}.txt").write_text("\n".join(["Bob B-PER", "sat O", ""] * count))
    capsys.readouterr()
    argv = ["eval", str(tagger), "--data", str(folder), "--json", "--quiet", "--split", "test"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["per_entity_f1"]["PER"]["support"] == 3
    (folder / "test.txt").unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder}: no test file among dev.txt;" in err, err


def test_a_causal_lm_is_evaluated_on_a_whole_text_file(tmp_path, capsys):
    lm = ["train", "--model", "tiny", "--seq-len", "16", "--batch-size", "4", "--steps", "1"]
    run = tmp_path / "lm"
    assert main([*lm, "--quiet", "--out", str(run)]) == 0
    text = tmp_path / "new.txt"
    text.write_text("a" * 170)  # one paragraph of 170 byte tokens: 10 windows of 16 + 1
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(text), "--json", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["data"] == str(text) and metrics["tokens"] == 160


def test_the_digits_cnn_refuses_data_in_one_line(digits_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", str(digits_run), "--data", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "evaluates on its built-in data only; fix: drop --data" in err


def test_a_tagger_quantizes_without_its_data_and_eval_names_what_is_missing(tmp_path, capsys):
    """quantize read the CoNLL data to build the model ("no such CoNLL file"); prune, whose
    evaluation needs it, prunes and names the data gone; eval of the run names --data too."""
    run, data = _tagger(tmp_path)
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["quantize", str(run), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "model.safetensors").is_file()
    assert main(["prune", str(run), "--sparsity", "0.5", "--out", str(tmp_path / "p")]) == 0
    gone = f"{data}: no such CoNLL file or folder (the data {run} was trained on, moved or "
    assert gone in capsys.readouterr().err
    assert main(["eval", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert gone in err and f"lowbit eval {run} --data PATH)" in err, err
    quantized = tmp_path / "q"  # the run named as the one trained on the data, not the folder
    assert main(["eval", str(quantized), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert gone in err and f"lowbit eval {quantized} --data PATH)" in err, err
    new = tmp_path / "new.txt"  # the quantized folder against its source, on other data
    new.write_text("\n".join(["Ann B-PER", "sat O", ""] * 2))
    assert main(["eval", str(tmp_path / "q"), "--data", str(new), "--json", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["data"] == str(new) and "entity_f1" in metrics["baseline"]
    assert metrics["per_entity_f1"]["PER"]["support"] == 2


def test_a_run_from_before_labels_json_whose_data_moved_needs_its_data(tmp_path, capsys):
    """Its tags come from its data: --data cannot help it, and was offered as the fix."""
    run, data = _tagger(tmp_path)
    (run / "labels.json").unlink()  # as a run from before labels.json
    data.rename(tmp_path / "moved")
    new = tmp_path / "new.txt"
    new.write_text("\n".join(["Ann B-PER", "sat O", ""] * 2))
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(new), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" not in err, err
    assert "the run predates labels.json, so its tags come from its data); fix: restore" in err


def test_entity_f1_of_a_split_without_entities_is_not_applicable(tmp_path, capsys):
    """It read 0.0 (a model that finds nothing) in the summary, eval, metrics.jsonl and run.json,
    where the model predicted no entity either (a run of "O" tags alone)."""
    run, _ = _tagger(tmp_path, dev=ONLY_O, others=ONLY_O)
    out = capsys.readouterr().out
    assert "entity_f1 n/a -> n/a" in out
    records = (run / "metrics.jsonl").read_text().splitlines()
    evaluated = [json.loads(r) for r in records if '"validation"' in r]
    assert evaluated and all(r["entity_f1"] is None for r in evaluated)
    assert json.loads((run / "run.json").read_text())["final_metrics"]["entity_f1"] is None
    assert main(["eval", str(run), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["entity_f1"] is None
    assert main(["eval", str(run), "--quiet"]) == 0
    assert "entity_f1 n/a" in capsys.readouterr().out


def test_entities_predicted_where_there_are_none_score_0(tagger, tmp_path, capsys):
    """They scored n/a, as if the model had found nothing: precision 0 must show."""
    new = tmp_path / "only-o.txt"
    new.write_text("\n".join(["Ann O", "Lee O", "ran O", ""] * 3))
    capsys.readouterr()
    assert main(["eval", str(tagger), "--data", str(new), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["entity_f1"] == 0.0
    assert main(["eval", str(tagger), "--data", str(new), "--quiet"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert next(r for r in rows if r.startswith("ALL")).split()[1:] == ["0.0000"] * 3 + ["0"]


def test_a_nan_tagger_without_entities_scores_nan_not_n_a(tmp_path, capsys):
    """A NaN loss is told as NaN entity F1 too; the n/a of a split without entities hid it."""
    run, _ = _tagger(tmp_path, dev=ONLY_O, others=ONLY_O)
    diverge_classifier(run)
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["loss"] == metrics["entity_f1"] == "nan"


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_missing_folder_names_the_quantized_folders_too(command, tmp_path, capsys):
    assert main([command, str(tmp_path / "gone")]) == 2
    assert (
        capsys.readouterr()
        .err.rstrip()
        .endswith(
            "fix: give the --out folder of a run, or a folder that lowbit quantize/prune wrote"
        )
    )


def test_compare_reports_entity_f1_of_a_split_without_entities_as_n_a(tmp_path, capsys):
    """compare's table and results.json read the runs' null entity F1 as n/a / null."""
    _, data = _tagger(tmp_path, dev=ONLY_O, name="source", others=ONLY_O)
    study = tmp_path / "study"
    argv = ["compare", "--task", "token-classification", "--model", "tiny", "--data", str(data)]
    argv += ["--recipes", "fp32,bf16-mixed", "--steps", "1", "--seq-len", "12", "--seeds", "1"]
    assert main([*argv, "--batch-size", "4", "--quiet", "--out", str(study)]) == 0
    results = json.loads((study / "report" / "results.json").read_text())
    assert results["recipes"]["bf16-mixed"]["metrics"]["entity_f1"] == [None, None]
    table = (study / "report" / "report.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| bf16-mixed |"))
    assert row.split(" | ")[5] == "n/a", row
