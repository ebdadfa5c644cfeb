import pytest

from lowbit.train import TrainConfig
from lowbit.train import trainer as trainer_module
from tests.once import folder_once_per_session

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
    """A 2-step digits run at batch 8, shared by the tests that evaluate one (read only), trained
    once per session."""
    from lowbit.cli import main

    def make(folder):
        argv = ["train", "--task", "image-classification", "--steps", "2", "--batch-size", "8"]
        assert main([*argv, "--quiet", "--out", str(folder / "run")]) == 0
        return folder / "run"

    return folder_once_per_session(tmp_path_factory, "train-digits", make)


@pytest.fixture(scope="session")
def nano_run(tmp_path_factory):
    """A one-step causal-LM run on bytes in the default recipe (bf16-mixed), validated at its step:
    its next-token distributions are nearly flat. Read only (tests that change its checkpoint
    copy it), trained once per session."""
    from lowbit.cli import main

    def make(folder):
        argv = ["train", "--model", "nano", "--seq-len", "16", "--batch-size", "4"]
        argv += ["--eval-batches", "1", "--steps", "1", "--eval-interval", "1", "--quiet"]
        assert main([*argv, "--out", str(folder / "run")]) == 0
        return folder / "run"

    return folder_once_per_session(tmp_path_factory, "train-nano", make)
