"""Resuming a run: it continues on the data, and with the settings, it was trained with."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train
from lowbit.train import checkpoint as ckpt

WORDS = ["def", "class", "import", "return", "self", "value", "print", "lambda", "yield", "async"]


def write_corpus(path, reverse=False):
    """200 JSONL documents; ``reverse``: the same length, other contents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(200):
            text = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(60))
            f.write(json.dumps({"text": text[::-1] if reverse else text}) + "\n")


def crash_after(step):
    def crash(trainer):
        if trainer.step_idx == step:
            raise RuntimeError("simulated crash")

    return crash


def crashed_and_resumed(config, step: int):
    """``config`` trained until a crash at ``step`` (after its last checkpoint), then resumed:
    the resumed run's result, to compare with a run that went straight through."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, quiet=True, on_step=crash_after(step))
    return train(config, resume=True, quiet=True)


def test_a_relative_data_path_resumes_on_the_runs_data_from_another_folder(
    tiny_config, tmp_path, monkeypatch
):
    """`--data corpus.jsonl` names a file from where the run was started; resumed from another
    folder that holds another corpus.jsonl it used to train on that one (and record it)."""
    write_corpus(tmp_path / "first" / "corpus.jsonl")
    write_corpus(tmp_path / "second" / "corpus.jsonl", reverse=True)
    settings = {"steps": 4, "eval_interval": 2, "recipe": "fp32", "data": "corpus.jsonl"}
    monkeypatch.chdir(tmp_path / "first")
    straight = train(tiny_config(**settings, out=str(tmp_path / "a")), quiet=True)
    config = tiny_config(**settings, out=str(tmp_path / "b"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, quiet=True, on_step=crash_after(3))
    monkeypatch.chdir(tmp_path / "second")
    resumed = train(config, resume=True, quiet=True)
    assert resumed.train_loss == straight.train_loss
    a = ckpt.load(ckpt.latest(tmp_path / "a"))["model"]
    b = ckpt.load(ckpt.latest(tmp_path / "b"))["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["data_path"] == str(tmp_path / "first" / "corpus.jsonl")


def test_resuming_on_data_whose_contents_changed_is_refused(tiny_config, tmp_path):
    corpus = tmp_path / "data" / "corpus.jsonl"
    write_corpus(corpus)
    config = tiny_config(steps=4, eval_interval=2, recipe="fp32", data=str(corpus))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, quiet=True, on_step=crash_after(3))
    write_corpus(corpus, reverse=True)  # same length, so the batch stream's shape still fits
    with pytest.raises(UsageError, match=r"cannot resume .* holds other contents.*fix: restore"):
        train(config, resume=True, quiet=True)


IMAGES = {"task": "image-classification", "batch_size": 8, "eval_batches": 1, "recipe": "fp32"}
KILLED_RUN = """
import json, os, sys
from lowbit.train import TrainConfig, train

def kill(trainer):
    if trainer.step_idx == 5:  # after the checkpoint of step 4: SIGKILL, the OOM killer
        os._exit(9)

train(TrainConfig(**json.loads(sys.argv[1])), quiet=True, on_step=kill)
"""


def test_a_killed_run_resumes_with_its_metrics_complete_to_the_checkpoint(tmp_path):
    """A process killed after a checkpoint had left the metrics since the run began in the
    logger's buffer: metrics.jsonl was empty, and the resumed run's curves began at step 5."""
    settings = {**IMAGES, "steps": 6, "eval_interval": 2, "out": str(tmp_path / "run")}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(settings)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
    )
    assert killed.returncode == 9, killed.stderr.decode()[-2000:]
    assert ckpt.latest(tmp_path / "run").name == "step-0000004.pt"
    train(TrainConfig(**settings), resume=True, quiet=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["split"] == "validation"] == [0, 2, 4, 6]
