"""What users see when a multi-process run goes wrong: clear messages, no hang."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from lowbit.distributed import RankFailed
from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train
from tests.distributed.helpers import DIGITS, TINY

STEPS = 10_000


def crash_on_rank_1(trainer):
    if trainer.dist.rank == 1 and trainer.step_idx == 2:
        raise RuntimeError("boom")


def test_a_crashed_rank_stops_the_others_with_its_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # rank 0, left waiting for rank 1, would wait this long: far past the bound below (the whole
    # run, its ranks' start included, took 41 s on a busy machine here)
    monkeypatch.setenv("LOWBIT_DIST_TIMEOUT", "600")
    config = TrainConfig(steps=50, out=str(tmp_path / "run"), nproc=2, **DIGITS)
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 failed: RuntimeError: boom; the other ranks"):
        train(config, quiet=True, on_step=crash_on_rank_1)
    assert time.monotonic() - start < 300  # rank 0 was stopped, not left waiting for rank 1


def signal_the_launcher(trainer):
    if trainer.dist.rank == 0 and trainer.step_idx == 2:
        os.kill(os.getppid(), signal.SIGINT)  # the launcher alone, as kill -INT or a scheduler


def test_a_sigint_to_the_launcher_alone_stops_every_rank_with_a_checkpoint(
    tmp_path, monkeypatch, capfd
):
    """A Ctrl-C reaches every process of the terminal's group; a SIGINT sent to the launcher
    alone must stop the ranks the same way (it was swallowed and the run went on to its end).
    One rank says so (each rank printed it). Session 21, the same run: a launcher started with
    SIGINT ignored, as a shell script's background job (``lowbit train --nproc 2 ... &``) is,
    swallowed a later ``kill -INT`` and the run went on to its end."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # far more steps than the ranks take before the stop reaches them (a digits step is quick)
    config = TrainConfig(steps=STEPS, out=str(tmp_path / "run"), nproc=2, **DIGITS)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = train(config, quiet=True, on_step=signal_the_launcher)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.status == "interrupted" and 2 <= result.steps < STEPS
    assert result.checkpoint is not None and result.checkpoint.exists()
    assert capfd.readouterr().err.count("interrupted: saving a checkpoint") == 1


def test_port_in_use(tmp_path, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("MASTER_PORT", str(taken.getsockname()[1]))
        with pytest.raises(UsageError, match="is in use"):
            train(TrainConfig(steps=1, out=str(tmp_path / "run"), nproc=2, **TINY), quiet=True)


def test_global_batch_must_split_over_the_processes(tmp_path):
    with pytest.raises(UsageError, match="does not split evenly over 3 processes"):
        train(TrainConfig(steps=1, out=str(tmp_path / "run"), nproc=3, **TINY), quiet=True)


def test_unknown_strategy(tmp_path):
    with pytest.raises(UsageError, match="strategy"):
        train(TrainConfig(out=str(tmp_path / "run"), strategy="zero3", **TINY), quiet=True)


def test_a_multi_process_checkpoint_needs_a_strategy_to_resume(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(steps=1, out=str(out), strategy="ddp", **TINY), quiet=True)
    assert (out / "checkpoints" / "step-0000001.dcp").is_dir()
    from lowbit.train.trainer import Trainer

    with pytest.raises(UsageError, match="multi-process checkpoint; fix: resume with --strategy"):
        Trainer(TrainConfig(steps=2, out=str(out), **TINY), quiet=True, resume=True).fit(
            resume=True
        )


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """(folder, result) of a two-step run under --strategy fsdp, which the tests only read."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return out, train(TrainConfig(steps=2, out=str(out), strategy="fsdp", **TINY), quiet=True)


def test_lowbit_eval_reads_a_multi_process_checkpoint(tmp_path, fsdp_run):
    from lowbit.train import evaluate_run

    out, result = fsdp_run
    metrics, _ = evaluate_run(out, max_batches=TINY["eval_batches"])
    assert metrics["step"] == 2
    assert metrics["loss"] == pytest.approx(result.final_metrics["loss"], rel=1e-4)
    # quantize and prune read it too (the source's size came from torch.load of the folder)
    from lowbit.cli import main

    assert main(["quantize", str(out), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    assert main(["prune", str(out), "--pattern", "2:4", "--out", str(tmp_path / "p")]) == 0
    assert main(["eval", str(tmp_path / "q"), "--max-batches", "1"]) == 0


def test_eval_of_a_quantized_multi_process_run_compares_with_its_source(tmp_path, capsys, fsdp_run):
    """The source checkpoint of a quantized .dcp run is a folder: eval took it for gone ("the
    source checkpoint ... is gone") and showed no reference."""
    from lowbit.cli import main

    out, _ = fsdp_run
    assert main(["quantize", str(out), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q"), "--max-batches", "1"]) == 0
    printed = capsys.readouterr()
    assert "reference: the source model in fp32" in printed.out
    assert "gone" not in printed.out + printed.err
