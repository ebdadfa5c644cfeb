"""Session 39: `lowbit train` says in one start-up line which layers its recipe kept, and why; a
config file's blank ``grad_clip:`` or ``data:`` is refused as other blanks are (a written
``null``, as a run's config.yaml records it, still reads); `lowbit eval --data FILE` names the
file, not the split it stands in for, in its warnings, and a glob's split as a folder's (not
as a whole file); the entity table's ALL row has no score where no entity is true or predicted,
as the metric (it printed 0.0000)."""

import json
import sys
from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.train import TrainConfig, Trainer
from lowbit.train.config import read
from tests.commands.test_eval_progress_s30 import Terminal
from tests.train.test_eval_data_s38 import ONLY_O, _tagger
from tests.train.test_tracking_walk_s38 import _small_data, _train


def test_train_names_the_layers_its_recipe_kept_in_one_line(tmp_path, capsys):
    """`lowbit train`'s trainer, built (the start-up lines come before the first step)."""
    config = TrainConfig(
        model="nano", seq_len=16, recipe="fp8-tensorwise", data=_small_data(tmp_path)
    )
    Trainer(replace(config, out=str(tmp_path / "run")))
    kept = [line for line in capsys.readouterr().err.splitlines() if "kept in" in line]
    assert kept == [
        "lowbit: recipe fp8-tensorwise converted 21/22 layers; kept in bf16: lm_head (output "
        "head kept in high precision)"
    ]
    Trainer(replace(config, out=str(tmp_path / "quiet")), quiet=True)
    assert "kept in" not in capsys.readouterr().err


def test_the_kept_line_groups_many_layers_by_reason():
    """A model of many kept layers (here 12 Conv1d, which lowbit does not convert) is one line,
    a few names and a count of each reason's, not a line per layer."""
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), *[torch.nn.Conv1d(4, 4, 1) for _ in range(12)]
    )
    line = lowbit.convert(model, "fp8-tensorwise").kept_line("bf16")
    assert "\n" not in line
    assert line.startswith("converted 1/13 layers; kept in bf16: 12 layers, 1, 2, 3, 4 (+8 more) (")


def _config(tmp_path, text: str):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    return config


BLANKS = {  # a blank whose null means something: the fix says what (it said "(null)" too)
    "grad_clip:\nlr: 1e-3\n": "grad_clip has no value; fix: give it one (grad_clip: null or "
    "grad_clip: 0 for no clipping), or leave the setting out for its default",
    "data:  # to do\n": "data has no value; fix: give it one (data: null for the built-in "
    "data), or leave the setting out for its default",
    "data:\ngrad_clip:\n": "data, grad_clip have no value; fix: give each one (data: null for "
    "the built-in data; grad_clip: null or grad_clip: 0 for no clipping), or leave them out for "
    "their defaults",
}


def test_a_blank_grad_clip_or_data_in_a_config_file_is_refused(tmp_path, capsys):
    """``grad_clip:`` ran without clipping and ``data:`` on the built-in data, without a word;
    a run's config.yaml writes ``null`` there, never a blank, and that still reads."""
    out = tmp_path / "run"
    for text, problem in BLANKS.items():
        config = _config(tmp_path, text)
        assert _train("--config", str(config), "--out", str(out), "--quiet") == 2
        assert capsys.readouterr().err == f"lowbit: error: {config}: {problem}\n"
        assert not out.exists()
    config = tmp_path / "run.toml"  # TOML has no null: 0 alone
    config.write_text("grad_clip =  # to do\n")
    assert _train("--config", str(config), "--out", str(out), "--quiet") == 2
    assert "fix: give it one (grad_clip = 0 for no clipping), or" in capsys.readouterr().err
    config = _config(tmp_path, f"grad_clip: null\ndata: {_small_data(tmp_path)}\nsteps: 1\n")
    assert _train("--config", str(config), "--out", str(out), "--quiet") == 0
    assert "grad_clip: null\n" in (out / "config.yaml").read_text()


LONG = ["w O"] * 20 + [""]  # a sentence longer than the tagger's --seq-len 12


def test_eval_data_warnings_name_the_file_not_the_split(tmp_path, capsys):
    """ "1 of 2 validation sentences are longer": the file given is evaluated whole, no split;
    the note of a long evaluation named the validation split too."""
    run, _ = _tagger(tmp_path)
    new = tmp_path / "new.txt"
    new.write_text("\n".join(LONG + ["Ann B-PER", "ran O", ""] * 404))
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(new)]) == 0
    err = capsys.readouterr().err
    assert f"lowbit: warning: 1 of 405 sentences of {new} are longer than the run's" in err
    assert f"lowbit: note: evaluating {new} (whole file): 102 batches of 4;" in err
    assert "validation" not in err, err
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "test.txt").write_text(new.read_text())
    assert main(["eval", str(run), "--data", str(folder), "--split", "test", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"1 of 405 test sentences of {folder} are longer" in err


def test_the_all_row_of_a_split_without_entities_has_no_score(tmp_path, capsys):
    run, _ = _tagger(tmp_path, dev=ONLY_O, others=ONLY_O)
    capsys.readouterr()
    assert main(["eval", str(run), "--quiet"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert next(r for r in rows if r.startswith("ALL")).split() == ["ALL", "-", "-", "-", "0"]
    assert "(-: neither present nor predicted in the data evaluated; not averaged)" in rows


def test_eval_data_a_glob_is_evaluated_and_named_by_its_split(tmp_path, capsys, monkeypatch):
    """``--data 'd/*.txt'`` evaluated the glob's validation split (here validation.txt) and called
    it ``d/*.txt (whole file)`` in the note and the report's head, ``eval *.txt`` on the bar and
    ``"split": null`` in the --json line; a folder's note read "evaluating validation split of"."""
    lm = ["train", "--model", "tiny", "--seq-len", "16", "--batch-size", "4", "--steps", "1"]
    run = tmp_path / "lm"
    assert main([*lm, "--quiet", "--out", str(run)]) == 0
    data = tmp_path / "d"
    data.mkdir()
    for split, words in (("train", 50), ("validation", 3500), ("test", 50)):
        (data / f"{split}.txt").write_text("a " * words)  # 7,000 byte tokens: 110 batches of 4
    glob = f"{data}/*.txt"
    capsys.readouterr()
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["eval", str(run), "--data", glob, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "validation" and metrics["tokens"] == 437 * 16
    shown = terminal.getvalue()
    assert f"lowbit: note: evaluating the whole validation split of {glob}: 110 batches" in shown
    assert "eval validation" in shown and "whole file" not in shown, shown
    monkeypatch.undo()
    assert main(["eval", str(run), "--data", glob, "--max-batches", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(f"validation split of {glob}")
    assert main(["eval", str(run), "--data", str(data)]) == 0
    note = f"lowbit: note: evaluating the whole validation split of {data}: 110 batches of 4;"
    assert note in capsys.readouterr().err


def test_a_refused_resume_prints_only_its_error(tmp_path, capsys):
    """`lowbit train --resume RUN --optimizer-state 8bit` (or --steps below the run's step)
    printed the kept-layers line and the CPU-emulation warning of a run it did not start before
    its one-line refusal; a library user's `Trainer(config, resume=True)` likewise."""
    run = str(tmp_path / "digits")
    digits = ["train", "--task", "image-classification", "--batch-size", "2", "--steps", "2"]
    assert main([*digits, "--recipe", "fp8-tensorwise", "--quiet", "--out", run]) == 0
    capsys.readouterr()
    refusals = {
        ("--optimizer-state", "8bit"): "cannot resume with optimizer_state '8bit'",
        ("--steps", "1"): "steps 1 is below the run's step 2;",
    }
    for flags, problem in refusals.items():
        assert main(["train", "--resume", run, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lowbit: error: {problem}") and err.count("\n") == 1, err
    config = replace(read(run), optimizer_state="8bit", steps=3)
    with pytest.raises(UsageError, match="cannot resume with optimizer_state"):
        Trainer(config, resume=True)
    assert capsys.readouterr().err == ""


def test_a_checkpoint_without_its_step_is_named_not_a_lowbit_checkpoint(tmp_path, capsys):
    """`read_settings` took any dict with a ``config`` for a checkpoint: a foreign or edited file
    without its ``step`` ended the resume in a KeyError traceback."""
    import torch

    from lowbit.train import checkpoint

    out = tmp_path / "run"
    digits = ["--task", "image-classification", "--steps", "2", "--batch-size", "4"]
    assert main(["train", *digits, "--eval-interval", "2", "--out", str(out), "--quiet"]) == 0
    latest = checkpoint.latest(out)
    state = torch.load(latest, weights_only=False)
    del state["step"]
    torch.save(state, latest)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "4", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyError" not in err, err
