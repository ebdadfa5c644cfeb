"""What lowbit writes inside the data (a run's folder, a quantized or exported model) is left
out of a folder or glob, with a warning: read as data, a run written into its own data folder
could not be resumed ("step-0000002.pt: zip-compressed, not text"), or resumed on other data."""

import json
import random
import shutil

import pytest

from lowbit.cli import main
from lowbit.data import load_corpus, load_texts
from lowbit.errors import UsageError
from lowbit.train import trainer as trainer_module

WORDS = ("the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "over", "hills", "and")
TINY = ["--model", "nano", "--steps", "2", "--seq-len", "32", "--batch-size", "4"]


def write_documents(folder, count=40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(120))
        (folder / f"doc{i:03d}.txt").write_text(text + "\n")


@pytest.fixture(scope="module")
def run_in_data(tmp_path_factory):
    """``data/**/*`` trained for 2 steps into ``data/run``: the data folder and the run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "SAMPLE_TOKENS", 8)
        data = tmp_path_factory.mktemp("runs_in_data") / "data"
        write_documents(data)
        run = data / "run"
        argv = ["train", "--data", f"{data}/**/*", "--out", str(run), *TINY]
        assert main([*argv, "--eval-batches", "2", "--quiet"]) == 0
    return data, run


def test_a_run_inside_its_glob_data_resumes_on_the_same_documents(run_in_data, capsys, monkeypatch):
    run = run_in_data[1]
    monkeypatch.setattr(trainer_module, "SAMPLE_TOKENS", 8)
    first = json.loads((run / "run.json").read_text())["data_fingerprint"]
    assert first["total"]["files"] == 40
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "zip-compressed" not in err
    (line,) = [x for x in err.splitlines() if "left out the lowbit run in run/" in x]
    assert "checkpoints, config.yaml, metrics.jsonl, run.json" in line
    assert line.endswith("fix: none needed, or keep --out outside the data")
    info = json.loads((run / "run.json").read_text())
    assert info["data_fingerprint"] == first
    assert info["step"] == 3


def test_a_folder_with_a_run_inside_neither_reads_it_nor_advises_a_glob_that_would(
    run_in_data, tmp_path, capsys
):
    """``--data data``: the run's config.yaml, metrics.jsonl were "text files not read", whose
    fix advised ``data/**/*``, which read the run's files; a Hugging Face tokenizer saved in the
    run (merges.txt) was read as data."""
    data = tmp_path / "data"
    write_documents(data)
    shutil.copytree(run_in_data[1], data / "run")
    (data / "run" / "tokenizer" / "merges.txt").write_text("#version: 0.2\nt h\n")
    capsys.readouterr()
    names = {d.name for d in load_corpus(str(data)).splits["train"]}
    err = capsys.readouterr().err
    assert not [n for n in names if n.startswith("run/")]
    assert "not read" not in err and "**" not in err
    assert f"{data}: left out the lowbit run in run/" in err
    glob_names = {d.name for d in load_texts(f"{data}/**/*")}
    assert glob_names == {f"doc{i:03d}.txt" for i in range(40)}


def test_a_run_written_into_the_data_folder_itself_leaves_out_its_files_only(
    run_in_data, tmp_path, capsys
):
    """``--out data --overwrite``: the run's files sit beside the user's; those stay data."""
    data = tmp_path / "data"
    write_documents(data)
    for item in run_in_data[1].iterdir():
        copy = shutil.copytree if item.is_dir() else shutil.copy2
        copy(item, data / item.name)
    (data / "notes.md").write_text("# notes\n" + "the user's own words " * 10)
    capsys.readouterr()
    corpus = load_corpus(f"{data}/**/*")
    names = {d.name for docs in corpus.splits.values() for d in docs}
    assert names == {f"doc{i:03d}.txt" for i in range(40)} | {"notes.md"}
    err = capsys.readouterr().err
    assert f"left out the lowbit run in {data} (checkpoints, config.yaml," in err


def test_quantized_and_exported_models_inside_the_data_are_left_out(tmp_path, capsys):
    data = tmp_path / "data"
    write_documents(data, count=5)
    for folder, manifest in (("int8", "quantization.json"), ("hf", "lowbit_export.json")):
        (data / folder).mkdir()
        (data / folder / manifest).write_text("{}")
        (data / folder / "merges.txt").write_text("#version: 0.2\nt h\n")
    capsys.readouterr()
    names = {d.name for docs in load_corpus(str(data)).splits.values() for d in docs}
    assert names == {f"doc{i:03d}.txt" for i in range(5)}
    err = capsys.readouterr().err
    assert "hf/, a lowbit quantize, prune or export folder; int8/, a lowbit" in err
    # pointed at itself, a model's folder is read as asked
    assert {d.name for d in load_texts(f"{data}/int8/*.txt")} == {"merges.txt"}


def test_a_users_config_and_checkpoints_folder_are_data(tmp_path):
    """Neither a config.yaml beside a checkpoints/ folder without a lowbit checkpoint (a code
    tree of an ML project) nor another tool's run.json makes a folder a run."""
    data = tmp_path / "project"
    write_documents(data, count=3)
    (data / "config.yaml").write_text("lr: 0.1\n")
    (data / "run.json").write_text('{"job": 1}\n')
    (data / "checkpoints").mkdir()
    (data / "checkpoints" / "README.md").write_text("weights go here\n")
    names = {d.name for d in load_texts(f"{data}/**/*")}
    assert {"config.yaml", "run.json", "checkpoints/README.md"} <= names


def test_a_glob_of_nothing_but_a_runs_files_is_refused_naming_them(run_in_data):
    data = run_in_data[0]
    with pytest.raises(UsageError, match=r"no text read, only what lowbit wrote \(the lowbit run"):
        load_texts(f"{data}/**/*.jsonl")
