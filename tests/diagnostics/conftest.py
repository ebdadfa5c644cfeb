import pytest
import torch

from lowbit.train import TrainConfig
from lowbit.train import trainer as trainer_module

TINY_LM = {"seq_len": 32, "batch_size": 4, "eval_batches": 1, "device": "cpu"}


@pytest.fixture(autouse=True)
def one_thread_short_samples(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(trainer_module, "SAMPLE_TOKENS", 8)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lm_config(tmp_path):
    def make(**kw):
        return TrainConfig(**{**TINY_LM, "out": str(tmp_path / "run"), **kw})

    return make
