import pytest
import torch

from lowbit.cli import main
from lowbit.train import TrainConfig, train
from lowbit.train import trainer as trainer_module
from tests.once import folder_once_per_session

TRAIN = ["--steps", "1", "--eval-interval", "1", "--batch-size", "2", "--seq-len", "16", "--quiet"]


def _train(folder, **settings):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    patch.setattr(trainer_module, "SAMPLE_TOKENS", 4)
    try:
        train(TrainConfig(out=str(folder), eval_interval=settings["steps"], **settings))
    finally:
        patch.undo()
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def moved_tagger(tmp_path, monkeypatch):
    """``tmp_path``, made the working folder, holding ``tagger`` (a token-classification run of
    `TRAIN` on CoNLL data) and ``tagger-int8`` (quantized from it), whose data has since moved
    from ``conll`` to ``moved``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conll").mkdir()
    for split in ("train", "validation", "test"):
        lines = []
        for i in range(30):
            lines += [f"w{j} {'B-LOC' if j == 0 else 'O'}" for j in range(4 + i % 3)] + [""]
        (tmp_path / "conll" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    tagger = ["train", "--task", "token-classification", "--data", "conll", *TRAIN]
    assert main([*tagger, "--out", "tagger"]) == 0
    assert main(["quantize", "tagger", "--to", "int8", "--out", "tagger-int8"]) == 0
    (tmp_path / "conll").rename(tmp_path / "moved")
    return tmp_path


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory):
    """A tiny Llama trained 12 steps on stdlib bytes (default recipe bf16-mixed)."""
    settings = {"steps": 12, "seq_len": 32, "batch_size": 8, "eval_batches": 2}
    return folder_once_per_session(
        tmp_path_factory, "infer-lm", lambda folder: _train(folder / "lm", **settings)
    )


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The digits CNN trained a few steps (a Linear head, two convolutions)."""
    settings = {"task": "image-classification", "steps": 6, "batch_size": 32, "eval_batches": 2}
    return folder_once_per_session(
        tmp_path_factory, "infer-digits", lambda folder: _train(folder / "digits", **settings)
    )


@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory):
    """A 2-block GPT-2 (transformers' Conv1D projections) trained a few steps from a local folder,
    once per session."""
    return folder_once_per_session(tmp_path_factory, "infer-gpt2", _gpt2_run)


def _gpt2_run(folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=257, n_positions=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder / "gpt2")
    settings = {"steps": 6, "seq_len": 32, "batch_size": 8, "eval_batches": 2}
    return _train(folder / "run", model=str(folder / "gpt2"), **settings)


@pytest.fixture(scope="session")
def mixtral_run(tmp_path_factory):
    """A 2-layer Mixtral (4 experts of 3-D weights, top-2) trained a few steps in fp8-tensorwise,
    once per session."""
    return folder_once_per_session(tmp_path_factory, "infer-mixtral", _mixtral_run)


def _mixtral_run(folder):
    from tests.moe import mixtral

    mixtral(max_position_embeddings=64).save_pretrained(folder / "mixtral")
    settings = {"steps": 4, "seq_len": 32, "batch_size": 8, "eval_batches": 2}
    return _train(
        folder / "run", model=str(folder / "mixtral"), recipe="fp8-tensorwise", **settings
    )
