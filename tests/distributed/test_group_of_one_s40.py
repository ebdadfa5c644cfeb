"""Session 40: one process with ``--strategy`` joins a group of one without a port. It picked a
free port, closed it, and bound it again in init_process_group: a race with every process picking
ports beside it (another run's ranks), which a full test run lost now and then."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest

from lowbit.train import TrainConfig, evaluate_run, train
from tests.distributed.helpers import TINY


@pytest.fixture
def every_port_taken(monkeypatch):
    """The port a one-process group would pick, taken by another process's server in between
    (the race, made certain): `free_port` answers a port that is listened on."""
    import lowbit.distributed.context as context

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(context, "free_port", lambda: taken.getsockname()[1])
        yield


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_one_process_strategy_run_needs_no_free_port(
    tmp_path, monkeypatch, strategy, every_port_taken
):
    """Trains, saves its DCP checkpoint, resumes from it and is evaluated, while every port it
    could have picked is taken; the caller's variables, a MASTER_PORT of its own included (for a
    later torchrun), are as they were."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_PORT", "not a port: unused by a group of one")
    out = tmp_path / "run"
    config = TrainConfig(model="nano", strategy=strategy, steps=1, out=str(out), **TINY)
    assert train(config, quiet=True).steps == 1
    resumed = train(dataclasses.replace(config, steps=2), resume=True, quiet=True)
    assert resumed.steps == 2
    assert (out / "checkpoints" / "step-0000002.dcp").is_dir()
    metrics, _ = evaluate_run(out, max_batches=TINY["eval_batches"])
    assert metrics["loss"] > 0
    assert os.environ["MASTER_PORT"] == "not a port: unused by a group of one"
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"} & {
        *os.environ
    }
