"""Session 29: `lowbit train`'s config files, their flags, and a warmup as long as the run."""

import yaml

from lowbit.cli import main
from lowbit.train import trainer as trainer_module

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]


def _train(*args: str) -> int:
    return main(["train", *NANO, "--quiet", *args])


def test_no_wandb_turns_off_the_wandb_of_a_config_file(tmp_path, capsys):
    """Flags override the file, but `wandb: true` there could not be turned off: --no-wandb was
    an unknown flag (exit 2)."""
    config = tmp_path / "run.yaml"
    config.write_text("wandb: true\nsteps: 1\nwarmup_steps: 0\n", encoding="utf-8")
    out = tmp_path / "run"
    assert _train("--config", str(config), "--no-wandb", "--out", str(out)) == 0
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["wandb"] is False
    assert "wandb" not in capsys.readouterr().err  # no "the wandb package is not installed"


def test_a_section_of_a_config_file_is_named_as_one(tmp_path, capsys):
    """A ``[train]`` table was "unknown setting 'train'" with the list of settings, which held
    every name the user had written inside it."""
    config = tmp_path / "run.toml"
    config.write_text("[train]\nsteps = 1\n", encoding="utf-8")
    assert _train("--config", str(config), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'train' is a section" in err and "top level" in err, err
    assert not (tmp_path / "run").exists()


def test_a_wrong_type_in_a_config_file_names_the_file(tmp_path, capsys):
    """ "steps must be an integer, got 'two'" did not say where: no flag was given."""
    config = tmp_path / "run.yaml"
    config.write_text("steps: two\n", encoding="utf-8")
    assert _train("--config", str(config), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lowbit: error: {config}: steps must be an integer, got 'two'; fix: correct it"


def test_a_given_warmup_as_long_as_the_run_is_warned_of(tmp_path, capsys):
    """``--warmup-steps 100 --steps 3`` trained at a fraction of --lr, rising, and never decayed,
    without a word. The task's default warmup (20) is its default length's: no warning."""
    config = tmp_path / "run.toml"
    config.write_text("warmup-steps = 3\n", encoding="utf-8")
    for i, given in enumerate((["--warmup-steps", "100"], ["--config", str(config)])):
        assert _train(*given, "--steps", "3", "--out", str(tmp_path / f"run{i}")) == 0
        warned = [line for line in capsys.readouterr().err.splitlines() if "warmup" in line]
        assert len(warned) == 1 and "is not below the run's 3 steps" in warned[0], warned
        assert warned[0].endswith("fix: --warmup-steps below 3, or more --steps")
    assert _train("--config", str(config), "--steps", "4", "--out", str(tmp_path / "run")) == 0
    assert _train("--steps", "3", "--out", str(tmp_path / "default")) == 0
    assert "warmup" not in capsys.readouterr().err


def test_a_run_aborted_before_its_first_checkpoint_says_there_is_none(
    tmp_path, capsys, monkeypatch
):
    """A Ctrl-C in the first validation was told "the last complete checkpoint is intact", of
    a run that had written none; one after a checkpoint names it."""

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", interrupt)
    assert _train("--steps", "2", "--warmup-steps", "0", "--out", str(out)) == 130
    err = capsys.readouterr().err.strip()
    assert err == "lowbit: aborted; no checkpoint was written, nothing to resume"
    assert not out.exists()
    monkeypatch.undo()
    assert _train("--steps", "2", "--warmup-steps", "0", "--out", str(out)) == 0
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", interrupt)
    assert _train("--resume", str(out), "--steps", "3") == 130
    saved = out / "checkpoints" / "step-0000002.pt"
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"checkpoint {saved} is intact; resume with: lowbit train --resume {out}")
    )


def test_a_run_on_the_built_in_data_resumes_with_it_named(tmp_path, capsys):
    """``--data stdlib`` names the built-in data a run without --data trained on (and the
    reverse); resuming with it was refused: "the run was trained with None"."""
    out = str(tmp_path / "run")
    assert _train("--steps", "1", "--warmup-steps", "0", "--out", out) == 0
    assert _train("--resume", out, "--steps", "2", "--data", "stdlib") == 0
    named = str(tmp_path / "named")
    assert _train("--steps", "1", "--warmup-steps", "0", "--data", "stdlib", "--out", named) == 0
    assert _train("--resume", named, "--steps", "2") == 0
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text("other text\n" * 200, encoding="utf-8")
    assert _train("--resume", named, "--steps", "3", "--data", str(text)) == 2
    assert "cannot resume" in capsys.readouterr().err
