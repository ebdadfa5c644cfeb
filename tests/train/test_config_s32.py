"""`lowbit train --config` files: a bug hunt through the public interfaces (session 32)."""

import json

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.train import TrainConfig, build_config, load_file
from lowbit.train.config import write


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("run.yaml", "lr: 1e-3\nsteps: 5\nlr: -1\n", " (lines 1 and 3)"),
        ("run.json", '{"lr": 1e-3, "steps": 5, "lr": -1}', ""),
    ],
)
def test_a_setting_given_twice_in_a_config_file_is_refused(tmp_path, capsys, name, text, where):
    """YAML and JSON parsers keep a key's later value without a word: a second ``lr:`` line
    (added below the first, or the first edited while the other stayed) silently decided the run.
    Here the later value is a wrong one, which was refused as if the file held no other."""
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"lowbit: error: {path}: 'lr' is given twice{where}; fix: keep one\n"
    assert not out.exists()


def test_a_yaml_merge_key_may_be_overridden(tmp_path):
    """YAML's ``<<:`` merges a mapping whose keys the mapping itself may set again: no twice."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.001\n<<: {lr: 0.002, steps: 7}\n")
    assert load_file(path) == {"lr": 0.001, "steps": 7}


@pytest.mark.parametrize(
    ("name", "text"),
    [("run.json", '{"lr": 0.001}'), ("run.toml", "lr = 0.001\n"), ("run.yaml", "lr: 0.001\n")],
)
def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path, name, text):
    """Notepad and other Windows editors start a UTF-8 file with a byte order mark: a JSON or TOML
    file was refused as malformed ("Unexpected UTF-8 BOM (decode using utf-8-sig)")."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_file(path) == {"lr": 0.001}


@pytest.mark.parametrize(
    ("key", "nearest"), [("eval_intreval", "eval_interval"), ("LR", "lr"), ("stepz", "steps")]
)
def test_a_mistyped_setting_is_refused_naming_the_nearest(tmp_path, key, nearest):
    """A typo was answered with the list of all 33 settings, in which the one meant had to be
    found by eye; the nearest is named first."""
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({key: 3}))
    with pytest.raises(UsageError, match=f"unknown setting '{key}'; fix: did you mean '{nearest}'"):
        load_file(path)


def test_a_run_configs_relative_data_is_the_runs_from_another_folder(tmp_path, monkeypatch):
    """``lowbit train --config RUN/config.yaml`` repeats a run; a relative --data path it recorded
    was read from the folder the repeat started in: another file of that name there was trained
    on without a word (resume, eval and compare read run.json's absolute path already)."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for folder, text in ((project, "the run's data"), (elsewhere, "other data")):
        folder.mkdir()
        (folder / "corpus.jsonl").write_text(json.dumps({"text": text}) + "\n")
    run = project / "run"
    run.mkdir()
    write(TrainConfig(data="corpus.jsonl", out="run"), run)
    (run / "run.json").write_text(json.dumps({"data_path": str(project / "corpus.jsonl")}))
    monkeypatch.chdir(elsewhere)
    config = build_config(load_file(run / "config.yaml"), {"out": "repeat"})
    assert config.data == str(project / "corpus.jsonl")


@pytest.mark.parametrize("name", ["seed", "grad_accum", "keep_last", "nproc", "eval_batches"])
def test_a_setting_left_without_a_value_is_refused_in_one_line(tmp_path, capsys, name):
    """A key with no value (``seed:``, a template's blank) is YAML's null, which these settings
    cannot mean: the run stopped on a TypeError traceback as it compared it."""
    path = tmp_path / "run.yaml"
    path.write_text(f"{name}:\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"lowbit: error: {path}: {name} has no value; fix: give it one, or leave the "
        "setting out for its default\n"
    )
    assert not out.exists()
