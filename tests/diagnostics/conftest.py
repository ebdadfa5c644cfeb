import pytest

from lowbit.train import TrainConfig
from lowbit.train import trainer as trainer_module

TINY_LM = {"seq_len": 32, "batch_size": 4, "eval_batches": 1, "device": "cpu"}


@pytest.fixture(autouse=True)
def short_samples(monkeypatch):
    monkeypatch.setattr(trainer_module, "SAMPLE_TOKENS", 8)


@pytest.fixture
def lm_config(tmp_path):
    def make(**kw):
        return TrainConfig(**{**TINY_LM, "out": str(tmp_path / "run"), **kw})

    return make
