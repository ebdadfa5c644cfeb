"""Session 30: run.json's step follows the checkpoints while the run trains, and the summary's
memory figures are labelled in the units they are computed in."""

from __future__ import annotations

import json

from lowbit.train import TrainConfig, train

TINY = {"model": "nano", "seq_len": 16, "batch_size": 2, "eval_batches": 1, "eval_interval": 100}


def test_run_json_holds_the_step_of_the_last_checkpoint_while_the_run_trains(tmp_path):
    """A run killed after its last checkpoint (in the final evaluation or sample) read as
    "running" at step 0, though README says run.json holds the last step."""
    out = tmp_path / "run"
    seen = {}

    def on_step(trainer):
        seen[trainer.step_idx] = json.loads((out / "run.json").read_text())

    config = TrainConfig(steps=4, save_interval=2, out=str(out), **TINY)
    result = train(config, quiet=True, on_step=on_step)
    assert [(seen[s]["status"], seen[s]["step"]) for s in (1, 2, 3)] == [
        ("running", 0),
        ("running", 2),
        ("running", 2),
    ]
    assert "MiB RSS" in result.summary() and " MB" not in result.summary()


def test_the_runs_own_sample_cut_by_the_positions_says_nothing(tmp_path, capsys, monkeypatch):
    """A model of few positions printed "note: the model takes 16 positions ... at most N new
    tokens, not 160" after training, --quiet or not: the run asked for no length."""
    from lowbit.train import trainer as trainer_module
    from tests.llama import save_llama

    save_llama(tmp_path / "model")  # 64 positions
    monkeypatch.setattr(trainer_module, "SAMPLE_TOKENS", 100)
    settings = {**TINY, "model": str(tmp_path / "model")}
    result = train(TrainConfig(steps=1, out=str(tmp_path / "run"), **settings), quiet=True)
    assert result.sample is not None and "note:" not in capsys.readouterr().err


def test_eval_and_generate_of_a_model_folder_run_print_no_loading_bar(tmp_path, capsys):
    """transformers' "Loading weights" bar came through on every load of a run trained from a
    --model folder (training hides it under --quiet; the other commands report themselves)."""
    from lowbit.cli import main
    from tests.llama import save_llama

    save_llama(tmp_path / "model")
    run = str(tmp_path / "run")
    settings = ["--model", str(tmp_path / "model"), "--seq-len", "16", "--batch-size", "2"]
    assert main(["train", *settings, "--steps", "1", "--quiet", "--out", run]) == 0
    capsys.readouterr()
    assert main(["eval", run, "--max-batches", "1"]) == 0
    assert main(["generate", run, "--max-new-tokens", "2"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
