"""Session 38: a config file's key left without a value, and W&B failing around a run."""

import json
import sys
from pathlib import Path

import pytest

from tests.train.test_tracking_walk_s38 import _FakeWandb, _small_data, _train

BLANK_STEPS = {  # `steps` left without a value, as each format spells it
    "run.yaml": ("steps:\nlr: 1e-3\n", "steps has no value"),
    "run.json": ('{"steps": null, "lr": 1e-3}', "steps has no value (null)"),
    "run.toml": ("lr = 1e-3\nsteps =   # to do\n", "line 2: steps has no value"),
}


@pytest.mark.parametrize("name", sorted(BLANK_STEPS))
def test_a_setting_left_without_a_value_is_refused_in_every_format(tmp_path, capsys, name):
    """``steps:`` ran the task's 400 steps without a word (where ``wandb:`` was refused), and
    TOML's ``steps =`` was "malformed config (Invalid value (at line 2, column 9))"."""
    text, problem = BLANK_STEPS[name]
    config = tmp_path / name
    config.write_text(text)
    out = tmp_path / "run"
    assert _train("--config", str(config), "--out", str(out), "--quiet") == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {config}: {problem}; fix: give it one, or leave the setting out for "
        "its default\n"
    )
    assert not out.exists()


def test_a_copy_of_a_runs_config_reads_its_nulls_and_refuses_a_blank(tmp_path, capsys):
    """A run's config.yaml records null for settings whose null is a value (no --epochs, one
    process, the recipe's loss scale): a copy of it reads back, and a blank line added to it is
    refused by name, all such lines at once; a blank that a flag replaces is warned of."""
    run = tmp_path / "run"
    assert (
        _train("--data", _small_data(tmp_path), "--steps", "1", "--out", str(run), "--quiet") == 0
    )
    capsys.readouterr()
    text = (run / "config.yaml").read_text().replace("lr: 0.003\n", "lr:\n")
    text = text.replace("seed: 0\n", "seed:\n")  # lr and seed left blank
    text = text.replace("grad_clip: 1.0\n", "grad_clip: null\n")  # as --grad-clip 0 records it
    copy = tmp_path / "copy.yaml"
    copy.write_text(text)
    assert _train("--config", str(copy), "--out", str(tmp_path / "new"), "--quiet") == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {copy}: lr, seed have no value; fix: give each one, or leave "
        "them out for their defaults\n"
    )
    copy.write_text(text.replace("seed:\n", ""))
    new = tmp_path / "new"
    assert _train("--config", str(copy), "--lr", "1e-3", "--out", str(new), "--quiet") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "no value" in line]
    assert warnings == [
        f"lowbit: warning: {copy}: lr has no value; ignored, as --lr replaces it; fix: "
        "correct it in the file, which a run without --lr refuses"
    ]
    assert "grad_clip: null\n" in (new / "config.yaml").read_text()  # not clipped


class _FailingWandb(_FakeWandb):
    """A wandb whose ``failing`` call ("init", "log" or "finish") raises, as W&B does on a bad
    WANDB_* variable, an unwritable folder, or an internal error of its own."""

    def __init__(self, failing: str):
        super().__init__()
        self.failing = failing

    def init(self, **options):
        if self.failing == "init":
            raise ValueError('invalid mode "bogus"\n(a second line of W&B\'s)')
        run = super().init(**options)
        if self.failing == "log":
            run.log = _raise(RuntimeError("wandb service died"))
        if self.failing == "finish":
            run.finish = _raise(KeyError("history"))
        return run


def _raise(error: Exception):
    def call(*args, **kwargs):
        raise error

    return call


WANDB_WARNINGS = {
    "init": 'W&B did not start (ValueError: invalid mode "bogus"); logging without it; fix: '
    "check the WANDB_* environment variables (unset a wrong one) and that {out}/wandb is "
    "writable, update wandb (pip install -U wandb), or drop --wandb",
    "log": "W&B failed logging step 0 (RuntimeError: wandb service died); the run goes on "
    "without it, W&B keeping what it logged before; fix: see the logs in {out}/wandb for why",
    "finish": "W&B failed to finish (KeyError: 'history'); the run's own files are complete, "
    "W&B keeping what it logged before; fix: see the logs in {out}/wandb for why",
}


@pytest.mark.parametrize("failing", sorted(WANDB_WARNINGS))
def test_a_wandb_failure_is_one_warning_and_the_run_completes(
    tmp_path, monkeypatch, capsys, failing
):
    """W&B raising in `wandb.init` (after the run folder was set up), in a step's log or in the
    closing finish stopped the run with W&B's traceback, marked failed, though W&B only copies
    what metrics.jsonl and TensorBoard hold."""
    monkeypatch.setitem(sys.modules, "wandb", _FailingWandb(failing))
    out = tmp_path / "run"
    argv = ["--data", _small_data(tmp_path), "--steps", "2", "--wandb", "--out", str(out)]
    assert _train(*argv, "--quiet") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "W&B" in line]
    assert warnings == [f"lowbit: warning: --wandb: {WANDB_WARNINGS[failing].format(out=out)}"]
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert (out / "checkpoints" / "step-0000002.pt").is_file()


def test_a_wandb_that_fails_to_import_is_one_warning(tmp_path, monkeypatch, capsys):
    """An install whose import raises other than ImportError (a protobuf too new for it) stopped
    the run with the import's traceback."""

    (tmp_path / "wandb.py").write_text(
        'raise TypeError("Descriptors cannot be created directly.\\nMore lines.")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    out = tmp_path / "run"
    argv = ["--data", _small_data(tmp_path), "--steps", "1", "--wandb", "--out", str(out)]
    assert _train(*argv, "--quiet") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "wandb" in line]
    assert warnings == [
        "lowbit: warning: --wandb: the wandb package does not import (TypeError: Descriptors "
        "cannot be created directly.); logging without it; fix: pip install -U wandb, or drop "
        "--wandb"
    ]


def test_a_users_own_config_yaml_gets_a_hand_written_files_checks(tmp_path, monkeypatch, capsys):
    """A file of the user's named config.yaml, in a folder of theirs, was taken for a run's own
    by its name: ``steps:`` ran the task's 400 steps, and data beside it was "no such file"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "data" / "train.txt").write_text("text\n" * 50)
    config = tmp_path / "configs" / "config.yaml"
    config.write_text("model: nano\nsteps:\ndata: data/train.txt\n")
    assert _train("--config", "configs/config.yaml", "--out", "run", "--quiet") == 2
    assert capsys.readouterr().err == (
        "lowbit: error: configs/config.yaml: steps has no value; fix: give it one, or "
        "leave the setting out for its default\n"
    )
    config.write_text("model: nano\nsteps: 1\ndata: data/train.txt\n")
    assert _train("--config", "configs/config.yaml", "--out", "run", "--quiet") == 2
    assert "fix: data: configs/data/train.txt (or an absolute path)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_data_whose_name_holds_a_bracket_is_read_as_spelt(tmp_path, monkeypatch, capsys):
    """``data: corpus[1].txt``, there in the working folder, was read as a glob (``corpus1.txt``)
    and refused for the corpus1.txt beside the config file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus[1].txt").write_text(Path(_small_data(tmp_path)).read_text())
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "corpus1.txt").write_text("another corpus\n")
    (tmp_path / "exp" / "run.yaml").write_text("data: corpus[1].txt\nsteps: 1\n")
    assert _train("--config", "exp/run.yaml", "--out", "run", "--quiet") == 0, capsys.readouterr()
    assert (tmp_path / "run" / "run.json").is_file()
