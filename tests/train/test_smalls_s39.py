"""Session 39: `lowbit train` says in one start-up line which layers its recipe kept, and why; a
config file's blank ``grad_clip:`` or ``data:`` is refused as other blanks are (a written
``null``, as a run's config.yaml records it, still reads); `lowbit eval --data FILE` names the
file, not the split it stands in for, in its warnings; the entity table's ALL row has no score
where no entity is true or predicted, as the metric (it printed 0.0000)."""

from dataclasses import replace

import torch

import lowbit
from lowbit.cli import main
from lowbit.train import TrainConfig, Trainer
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


def test_a_blank_grad_clip_or_data_in_a_config_file_is_refused(tmp_path, capsys):
    """``grad_clip:`` ran without clipping and ``data:`` on the built-in data, without a word;
    a run's config.yaml writes ``null`` there, never a blank, and that still reads."""
    out = tmp_path / "run"
    for text, name in (("grad_clip:\nlr: 1e-3\n", "grad_clip"), ("data:  # to do\n", "data")):
        config = _config(tmp_path, text)
        assert _train("--config", str(config), "--out", str(out), "--quiet") == 2
        assert capsys.readouterr().err == (
            f"lowbit: error: {config}: {name} has no value (null); fix: give it one, or leave "
            "the setting out for its default\n"
        )
        assert not out.exists()
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
