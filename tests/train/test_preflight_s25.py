"""Pre-flight checks: a run that cannot start is refused in one line before its model is built
or its ranks are spawned."""

from __future__ import annotations

import pytest
import torch

from lowbit.cli import main
from lowbit.distributed import launch
from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train
from lowbit.train import trainer as trainer_module

# a batch of 12, which --nproc 2 and 4 split too: the fix names only counts that split it (s43)
FSDP_3_8BIT = ["--model", "nano", "--strategy", "fsdp", "--nproc", "3", "--batch-size", "12"]


def _not_started(*args, **kwargs):
    raise AssertionError("the ranks were started")


def test_fsdp_over_a_rank_count_that_splits_state_blocks_is_refused_before_the_ranks_start(
    tmp_path, capsys, monkeypatch
):
    """`--strategy fsdp --nproc 3 --optimizer-state 8bit` was refused by each rank's Trainer,
    after the ranks' set-up (~30 s), and printed by the ranks."""
    monkeypatch.setattr(launch, "spawn", _not_started)
    argv = ["train", *FSDP_3_8BIT, "--optimizer-state", "8bit", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("lowbit: error: fsdp over 3 processes splits the 256-value blocks")
    assert err.endswith("fix: --nproc 2 or 4, or --optimizer-state fp32 or bf16")
    assert not (tmp_path / "run").exists()


def test_under_torchrun_the_rank_counts_are_named_by_torchrun_s_flag(tmp_path, capsys, monkeypatch):
    """torchrun has no --nproc: its process count is --nproc-per-node."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"}
    for name, value in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(launch, "run_rank", _not_started)
    argv = ["train", "--model", "nano", "--strategy", "fsdp", "--batch-size", "12"]
    argv += ["--optimizer-state", "8bit", "--steps", "1", "--out", str(tmp_path / "run")]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("fix: torchrun --nproc-per-node 2 or 4, or --optimizer-state fp32 or bf16")


def test_a_model_whose_states_exceed_the_machines_memory_is_refused_before_it_is_built(
    tmp_path, capsys, monkeypatch
):
    """`lowbit train --model llama-7b` on a CPU allocated the fp32 model (27 GB) and was killed
    for it, or swapped for minutes. Its states under bf16-mixed and fp32 Adam: 16 bytes for each
    of its 6.48B parameters (byte vocabulary)."""
    monkeypatch.setattr(trainer_module, "available_memory", lambda: 8 * 2**30)
    argv = ["train", "--model", "llama-7b", "--steps", "1", "--out", str(tmp_path / "run")]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("lowbit: error: model llama-7b (6.48B parameters) needs 96.5 GiB")
    assert "more than the 8.0 GiB available here" in err
    assert "fix: plan it with lowbit estimate --model llama-7b --recipe bf16-mixed" in err
    assert "--optimizer-state 8bit or a GPU" in err
    assert not (tmp_path / "run").exists()


def test_the_memory_check_refuses_only_what_the_model_states_alone_cannot_fit(
    tmp_path, monkeypatch
):
    """The Python API too: nano's states (183,872 parameters x 16 bytes) fit in that many bytes,
    and not in one fewer."""
    needed = 183_872 * 16
    config = TrainConfig(model="nano", seq_len=32, batch_size=2, steps=1, eval_batches=1)
    monkeypatch.setattr(trainer_module, "available_memory", lambda: needed - 1)
    with pytest.raises(UsageError, match=r"model nano .* more than the 0.0 GiB available"):
        train(TrainConfig(**{**config.to_dict(), "out": str(tmp_path / "a")}), quiet=True)
    monkeypatch.setattr(trainer_module, "available_memory", lambda: needed)
    train(TrainConfig(**{**config.to_dict(), "out": str(tmp_path / "b")}), quiet=True)


def test_ddp_ranks_on_one_machine_are_counted_once_each(tmp_path, capsys, monkeypatch):
    """Each DDP rank holds the whole model's states: two of them need twice the memory."""
    monkeypatch.setattr(trainer_module, "available_memory", lambda: 183_872 * 16 * 3 // 2)
    monkeypatch.setattr(launch, "spawn", _not_started)
    argv = ["train", "--model", "nano", "--strategy", "ddp", "--nproc", "2", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "x 2 DDP processes" in capsys.readouterr().err


def test_a_shard_that_splits_state_blocks_names_the_parameter_its_shard_and_the_fixes():
    """A Python-API user sharding a model themselves saw only "fix: shard along a dimension whose
    slices hold whole blocks". Here rank 0 of two holds 17 of the 34 rows of 128 values: 2176
    values, not whole 256-value blocks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from lowbit.distributed.context import free_port
    from lowbit.optim import build_optimizer

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        shard = DTensor.from_local(
            torch.zeros(17, 128), mesh, [Shard(0)], run_check=False, shape=(34, 128),
            stride=(128, 1),
        )  # fmt: skip
        model = torch.nn.Linear(128, 34, bias=False)
        model.weight = torch.nn.Parameter(shard)
        model.weight.grad = torch.zeros_like(model.weight)
        optimizer = build_optimizer(model.named_parameters(), state_precision="8bit")
        with pytest.raises(UsageError) as refused:
            optimizer.step()
    finally:
        dist.destroy_process_group()
    message = str(refused.value)
    assert message.startswith("parameter 'weight' (34, 128), sharded over 1 ranks: this rank's")
    assert (
        "shard (17, 128) holds 2176 values, not a multiple of the 256-value blocks of 8bit"
        in message
    )
    assert "fix: a rank count whose shards of it hold whole blocks" in message
    assert message.endswith(
        "state_precision fp32 or bf16 (lowbit train: --optimizer-state fp32 or bf16)"
    )
