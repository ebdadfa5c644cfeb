"""`lowbit train` launch, config reuse, resume and torchrun: a bug hunt through the public
interfaces (session 26)."""

from __future__ import annotations

import pytest
import torch
import yaml

from lowbit.cli import main
from lowbit.distributed import launch
from lowbit.errors import UsageError
from lowbit.train import TrainConfig, train
from lowbit.train import trainer as trainer_module

# An image-classification run of one step takes about a second on one thread.
TINY_IMAGES = ["--task", "image-classification", "--batch-size", "8", "--eval-batches", "1"]


def _train(*argv) -> int:
    return main(["train", *TINY_IMAGES, "--quiet", *map(str, argv)])


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    """A test process started under torchrun would make every run a rank of its group."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _as_torchrun_rank(monkeypatch, world: int) -> None:
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29598")
    monkeypatch.setenv("LOWBIT_DIST_TIMEOUT", "2")  # unrefused, rank 0 waits for rank 1 this long


def test_a_config_files_nproc_other_than_torchruns_world_size_is_refused(
    tmp_path, monkeypatch, capsys
):
    """`torchrun --nproc-per-node 2 -m lowbit train --config run.yaml` with `nproc: 4` in the file
    trained a 2-process run without a word (only the --nproc flag was checked)."""
    config = tmp_path / "run.yaml"
    config.write_text("nproc: 4\nsteps: 1\n")
    _as_torchrun_rank(monkeypatch, 2)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{config}: nproc 4, but torchrun started 2 processes (WORLD_SIZE 2)" in err
    assert "fix: nproc 2 there, or drop nproc" in err
    assert not (tmp_path / "run").exists()


def test_a_runs_recorded_nproc_follows_torchruns_world_size(tmp_path, monkeypatch, capsys):
    """A run's config.yaml records the process count the run had: reused (`--config
    RUN/config.yaml`, `--resume RUN`) under torchrun, that count follows the world size, as
    resharded multi-process checkpoints allow."""
    run = tmp_path / "run"
    assert _train("--steps", "1", "--out", run) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "nproc": 3}, sort_keys=False))
    started = []
    monkeypatch.setattr(launch, "run_rank", lambda config, *args: started.append(config.nproc))
    _as_torchrun_rank(monkeypatch, 2)
    assert _train("--config", run / "config.yaml", "--out", tmp_path / "again") == 0
    assert _train("--resume", run) == 0
    assert started == [2, 2]
    capsys.readouterr()


def test_a_python_configs_nproc_other_than_torchruns_world_size_is_refused(tmp_path, monkeypatch):
    """`train(TrainConfig(nproc=4))` in a rank of a 2-process torchrun job trained with 2."""
    _as_torchrun_rank(monkeypatch, 2)
    config = TrainConfig(task="image-classification", nproc=4, out=str(tmp_path / "run"))
    with pytest.raises(UsageError, match=r"nproc 4, but torchrun started 2 processes"):
        train(config, quiet=True)
    assert not (tmp_path / "run").exists()


def _not_started(*args, **kwargs):
    raise AssertionError("the run was set up")


def test_a_one_process_strategy_run_is_checked_against_the_machines_memory(
    tmp_path, monkeypatch, capsys
):
    """`--strategy ddp` with one process skipped the memory pre-flight: its rank left the check
    to a launcher that had not made it, and llama-7b's 27 GB were allocated before any word."""
    monkeypatch.setattr(trainer_module, "available_memory", lambda: 8 * 2**30)
    monkeypatch.setattr(launch, "run_rank", _not_started)
    argv = ["train", "--model", "llama-7b", "--strategy", "ddp", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: model llama-7b (6.48B parameters) needs 96.5 GiB")
    assert "more than the 8.0 GiB available here" in err


class _FakeCuda:
    """Two GPUs with ``free`` bytes each; the devices whose memory was read."""

    def __init__(self, monkeypatch, free: int):
        self.read = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "mem_get_info", self.mem_get_info)
        self.free = free

    def mem_get_info(self, device=None):
        self.read.append(str(device))
        return self.free, 80 * 2**30


LLAMA_7B = ["train", "--model", "llama-7b", "--steps", "1", "--quiet"]


def test_a_model_whose_states_exceed_the_gpus_free_memory_is_refused_before_it_is_built(
    tmp_path, monkeypatch, capsys
):
    """On CUDA the pre-flight read nothing: llama-7b's 96.5 GiB of states on an 80 GiB GPU were
    moved there tensor by tensor until CUDA ran out of memory, with a CUDA traceback. Now the
    GPU's free bytes are checked; on the CPU no CUDA context is created to read them."""
    cuda = _FakeCuda(monkeypatch, free=70 * 2**30)
    monkeypatch.setattr(trainer_module, "build_task", _not_started)
    argv = [*LLAMA_7B, "--device", "cuda", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("lowbit: error: model llama-7b (6.48B parameters) needs 96.5 GiB")
    assert "more than the 70.0 GiB free on cuda; fix: plan it with lowbit estimate" in err
    assert err.endswith("--optimizer-state 8bit or --strategy fsdp over more GPUs")
    assert cuda.read == ["cuda"] and not (tmp_path / "run").exists()
    monkeypatch.setattr(trainer_module, "available_memory", lambda: 8 * 2**30)
    assert main([*LLAMA_7B, "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert "more than the 8.0 GiB available here" in capsys.readouterr().err
    assert cuda.read == ["cuda"]  # not read for a CPU run


def test_a_torchrun_rank_checks_its_own_gpu_and_fsdp_shares_the_states_out(
    tmp_path, monkeypatch, capsys
):
    """Rank 1 trains on cuda:1 and holds half of FSDP's states (48.3 of 96.5 GiB)."""
    cuda = _FakeCuda(monkeypatch, free=40 * 2**30)
    _as_torchrun_rank(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(launch, "run_rank", _not_started)
    argv = [*LLAMA_7B, "--device", "cuda", "--strategy", "fsdp", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "needs 48.3 GiB" in err and "1/2 per FSDP process" in err
    assert "more than the 40.0 GiB free on cuda:1" in err
    assert cuda.read == ["cuda:1"]


def test_the_nproc_launcher_leaves_each_gpus_memory_to_its_rank(tmp_path, monkeypatch):
    """Read by the `--nproc` launcher, a GPU's memory would cost it a CUDA context (hundreds of MB
    of cuda:0) for the whole run."""
    cuda = _FakeCuda(monkeypatch, free=1)
    started = []
    monkeypatch.setattr(launch, "spawn", lambda config, *args: started.append(config.nproc))
    argv = ["train", "--model", "nano", "--device", "cuda", "--nproc", "2", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (started, cuda.read) == ([2], [])
