import pytest

from lowbit.train import TrainConfig
from lowbit.train import trainer as trainer_module

# Small enough that a causal-lm step takes milliseconds on a CPU.
TINY = {
    "causal-lm": {"seq_len": 32, "batch_size": 8, "eval_batches": 2},
    "image-classification": {"batch_size": 32},
    "token-classification": {"seq_len": 24, "batch_size": 16, "eval_batches": 2},
}


@pytest.fixture(autouse=True)
def short_samples(monkeypatch):
    """Short closing samples (one torch thread comes from tests/conftest.py)."""
    monkeypatch.setattr(trainer_module, "SAMPLE_TOKENS", 8)


@pytest.fixture
def tiny_config(tmp_path):
    def make(task="causal-lm", **kw):
        settings = {**TINY[task], "task": task, "out": str(tmp_path / "run"), **kw}
        return TrainConfig(**settings)

    return make


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A 2-step digits run at batch 8, shared by the tests that evaluate one (read only)."""
    from lowbit.cli import main

    run = tmp_path_factory.mktemp("digits") / "run"
    argv = ["train", "--task", "image-classification", "--steps", "2", "--batch-size", "8"]
    assert main([*argv, "--quiet", "--out", str(run)]) == 0
    return run
