"""`lowbit train` settings, config files, resume and torchrun: a bug hunt through the public
interfaces (session 25)."""

import os

import pytest
import torch
import yaml

from lowbit.cli import main
from lowbit.train import TrainConfig, train

# An image-classification run of one step takes about a second on one thread.
TINY_IMAGES = ["--task", "image-classification", "--batch-size", "8", "--eval-batches", "1"]


def _train(*argv) -> int:
    return main(["train", *TINY_IMAGES, "--quiet", *map(str, argv)])


def _saved(run) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_a_runs_config_reused_with_a_new_lr_derives_min_lr_and_save_interval_again(
    tmp_path, capsys
):
    """config.yaml records min_lr (lr / 10) and save_interval (the eval interval) as values:
    `--config RUN/config.yaml --lr 1e-4` was refused ("min_lr 0.0003 is above lr 0.0001; fix:
    lower --min-lr", a setting never given), a higher --lr kept the old min_lr, and `--resume
    --eval-interval N` kept saving at the old interval. A value the user gave stays."""
    run = tmp_path / "run"
    assert _train("--steps", "1", "--out", run) == 0
    again = tmp_path / "again"
    assert _train("--config", run / "config.yaml", "--lr", "1e-4", "--out", again) == 0
    assert (_saved(again)["lr"], _saved(again)["min_lr"]) == (1e-4, 1e-4 / 10)
    assert _saved(again)["steps"] == 1  # given: kept
    assert _train("--resume", run, "--steps", "3", "--eval-interval", "1") == 0
    assert (_saved(run)["eval_interval"], _saved(run)["save_interval"]) == (1, 1)
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == ["step-0000002.pt", "step-0000003.pt"]  # saved at step 2 too
    given = tmp_path / "given"
    assert _train("--steps", "1", "--min-lr", "1e-5", "--out", given) == 0
    third = tmp_path / "third"
    assert _train("--config", given / "config.yaml", "--lr", "1e-2", "--out", third) == 0
    assert (_saved(third)["lr"], _saved(third)["min_lr"]) == (1e-2, 1e-5)
    capsys.readouterr()


def test_nproc_other_than_torchruns_world_size_is_refused(monkeypatch, capsys):
    """Under torchrun `--nproc 4` with 2 processes trained a 2-process run without a word."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29599")
    monkeypatch.setenv("LOWBIT_DIST_TIMEOUT", "2")  # unrefused, rank 0 waits for rank 1 this long
    assert main(["train", "--nproc", "4", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--nproc 4, but torchrun started 2 processes" in err
    assert "fix: --nproc 2, or drop --nproc" in err


def test_a_one_process_strategy_run_keeps_the_callers_threads(tmp_path, monkeypatch):
    """A one-process `--strategy ddp` run set torch's threads to every core (without
    OMP_NUM_THREADS), overriding a library user's `torch.set_num_threads`, during and after."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # a machine with more cores than 1
    torch.set_num_threads(1)
    config = TrainConfig(
        task="image-classification", batch_size=8, eval_batches=1, steps=1, strategy="ddp",
        out=str(tmp_path / "run"),
    )  # fmt: skip
    seen = []
    train(config, quiet=True, on_step=lambda trainer: seen.append(torch.get_num_threads()))
    assert (seen, torch.get_num_threads()) == ([1], 1)


def test_a_quoted_tilde_in_eval_and_train_paths_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """`lowbit eval '~/runs/x'` (a script's argument) looked for a folder named `~`; so did
    `--config '~/x.yaml'`, and `--resume '~/r' --out ~/r` (one quoted) were said to differ."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert _train("--steps", "1", "--out", "~/run") == 0
    assert (home / "run" / "checkpoints" / "step-0000001.pt").is_file()
    capsys.readouterr()
    assert main(["eval", "~/run", "--max-batches", "1", "--json"]) == 0
    assert '"step": 1' in capsys.readouterr().out
    ckpt = "~/run/checkpoints/step-0000001.pt"
    assert main(["eval", "~/run", "--checkpoint", ckpt, "--max-batches", "1", "--json"]) == 0
    capsys.readouterr()
    (home / "c.yaml").write_text("steps: 1\n")
    assert _train("--config", "~/c.yaml", "--out", home / "other") == 0
    assert _train("--resume", "~/run", "--out", home / "run", "--steps", "2") == 0
    assert (home / "run" / "checkpoints" / "step-0000002.pt").is_file()


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    """A test process started under torchrun would make every run a rank of its group."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_a_tiny_epochs_value_trains_one_step_not_none(tmp_path, capsys):
    """`--epochs 1e-12` rounded to 0 steps: a run "completed" with no checkpoint, which `lowbit
    eval` and `--resume` then refused; any positive --epochs trains at least one step."""
    run = tmp_path / "run"
    assert _train("--epochs", "1e-12", "--out", run) == 0
    assert "1 step (completed)" in capsys.readouterr().out
    assert (run / "checkpoints" / "step-0000001.pt").is_file()


def test_a_run_folder_as_config_names_its_config_yaml(tmp_path, capsys):
    """`--config RUN` (the folder) was answered "no such config file; fix: check the path"."""
    run = tmp_path / "run"
    assert _train("--steps", "1", "--out", run) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"a run folder, not a config file; fix: --config {run / 'config.yaml'}" in err
