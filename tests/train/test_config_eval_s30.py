"""Session 30: a config file's mistyped setting that a flag replaces, and `lowbit eval` of a run
whose latest checkpoint is deleted (--keep-last) as it is opened."""

import os
import shutil

import pytest
import yaml

from lowbit.cli import main
from lowbit.train import checkpoint
from tests.once import run_once_per_session

NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def test_a_flag_replaces_a_mistyped_config_setting_with_a_warning(tmp_path, capsys):
    """``lr: fast`` in the file was refused though --lr replaced it; the run now trains on the
    flag's value, and a warning names the file's setting, which a run without --lr refuses."""
    config = tmp_path / "cfg.yaml"
    config.write_text('lr: "fast"\nsteps: many\nwandb: maybe\n')
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), *NANO, "--quiet", "--out", str(run)]
    flags = ["--lr", "1e-3", "--epochs", "0.001", "--no-wandb"]  # --epochs replaces steps too
    assert main([*argv, *flags]) == 0
    err = capsys.readouterr().err
    assert (
        f"lowbit: warning: {config}: lr must be a number, got 'fast'; ignored, as --lr replaces "
        f"it; fix: correct it in the file, which a run without --lr refuses"
    ) in err
    assert "steps must be an integer, got 'many'; ignored, as --epochs replaces it" in err
    assert "wandb must be true or false, got 'maybe'; ignored, as --wandb replaces it" in err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 1e-3 and saved["epochs"] == 0.001 and saved["wandb"] is False
    # without the flag the file's value is the run's, and still refused
    assert main([*argv, "--overwrite", "--epochs", "0.001", "--no-wandb"]) == 2
    assert f"lowbit: error: {config}: lr must be a number, got 'fast'; fix: correct it" in (
        capsys.readouterr().err
    )


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run with checkpoints at steps 1 and 2 (--keep-last 2), trained once per session (tests
    copy it)."""

    argv = ["train", *NANO, "--steps", "2", "--eval-interval", "1", "--keep-last", "2"]
    return run_once_per_session(tmp_path_factory, "config-eval-s30", argv)


def _saving_meanwhile(monkeypatch, times):
    """`checkpoint.load` as a run still training sees it the first ``times`` calls: before the
    checkpoint picked is opened the run saves the next step and deletes it (--keep-last). The
    paths each call was given are returned."""
    real_load, given = checkpoint.load, []

    def load(path):
        given.append(path)
        if len(given) <= times:
            step = int(path.stem.split("-")[1])
            os.replace(path, checkpoint.path_for(path.parent.parent, step + 1))
        return real_load(path)

    monkeypatch.setattr(checkpoint, "load", load)
    return given


def test_eval_picks_the_latest_again_when_it_is_deleted_as_it_is_opened(
    two_checkpoints, tmp_path, monkeypatch, capsys
):
    """It reported "unreadable checkpoint (No such file...); fix: give another checkpoint" of a
    run that had a newer one."""
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    given = _saving_meanwhile(monkeypatch, times=1)
    assert main(["eval", str(run), "--max-batches", "1"]) == 0
    assert [p.name for p in given] == ["step-0000002.pt", "step-0000003.pt"]
    assert "step-0000003.pt (step 2), validation split" in capsys.readouterr().out


def test_eval_retries_the_latest_a_bounded_number_of_times(
    two_checkpoints, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    given = _saving_meanwhile(monkeypatch, times=10)
    assert main(["eval", str(run), "--max-batches", "1"]) == 2
    assert len(given) == 3
    assert "step-0000004.pt: unreadable checkpoint (" in capsys.readouterr().err


def test_eval_of_a_given_checkpoint_deleted_as_it_is_opened_is_not_replaced(
    two_checkpoints, tmp_path, monkeypatch, capsys
):
    """--checkpoint names the one to evaluate: another one's numbers would be reported as its."""
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    given = _saving_meanwhile(monkeypatch, times=1)
    assert main(["eval", str(run), "--checkpoint", "2", "--max-batches", "1"]) == 2
    assert len(given) == 1
    assert "step-0000002.pt: unreadable checkpoint (" in capsys.readouterr().err


def test_compare_takes_a_flag_over_a_mistyped_config_setting(tmp_path, capsys):
    """`lowbit compare --config` refused the file's mistyped lr that its --lr replaces, as train
    did; and compare sets each run's seed by --first-seed, where the warning named --seed, a flag
    compare does not have."""
    config = tmp_path / "cfg.yaml"
    config.write_text("lr: fast\nseed: abc\n")
    argv = ["compare", "--recipes", "fp32", "--seeds", "1", "--config", str(config), "--lr", "1e-3"]
    tiny = ["--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--steps", "1"]
    out = ["--quiet", "--no-plots", "--threads", "1", "--out", str(tmp_path / "study")]
    assert main([*argv, *tiny, "--model", "nano", *out]) == 0
    err = capsys.readouterr().err
    assert "lr must be a number, got 'fast'; ignored, as --lr replaces it" in err, err
    assert "ignored, as --first-seed replaces it" in err and "--seed " not in err, err
