"""Session 35: `lowbit generate` of a small model spent ~135 ms of CPU a token (against ~1 ms of
arithmetic): autocast's bf16 GEMM handed every 64x64 matrix-vector product to all of torch's
threads, and the hand-off cost the time. `sample_text` (the command's and the trainer's closing
sample) now samples such a model on one thread, with the same tokens as before."""

from contextlib import nullcontext

import pytest
import torch

from lowbit.cli import main
from lowbit.infer import load_as_run
from lowbit.train import generate, load_run, sample_text


@pytest.fixture(scope="module")
def folders(lm_run, tmp_path_factory):
    """The tiny Llama run (bf16-mixed) and its int4-quantized inference folder."""
    int4 = tmp_path_factory.mktemp("generate_speed_s35") / "int4"
    assert main(["quantize", str(lm_run), "--to", "int4", "--out", str(int4)]) == 0
    return {"run": lm_run, "int4": int4}


@pytest.fixture
def two_threads():
    """torch on two intra-op threads, as `lowbit generate` starts on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


SETTINGS = [(7, 0.0, 40, 1.0), (5, 1.2, 5, 0.7)]  # seed, temperature, top-k, top-p
TOKENS = 8


def _argv(folder, seed, temperature, top_k, top_p):
    return [
        "generate", str(folder), "--prompt", "def ", "--max-new-tokens", str(TOKENS), "--seed", str(seed),
        "--temperature", str(temperature), "--top-k", str(top_k), "--top-p", str(top_p),
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["run", "int4"])
def test_a_seed_samples_what_it_sampled_on_every_thread(
    folders, kind, two_threads, capsys, monkeypatch
):
    """The command's sample for a seed, temperature, top-k and top-p equals `sample_text`'s on
    the caller's two threads (its choice of one thread turned off), token for token: the thread
    count changes the speed only."""
    folder = folders[kind]
    loaded = load_run(str(folder), None, "cpu") if kind == "run" else load_as_run(str(folder))
    model, tokenizer, precision = loaded.model, loaded.task.tokenizer, loaded.precision
    for seed, temperature, top_k, top_p in SETTINGS:
        with monkeypatch.context() as on_two_threads:
            on_two_threads.setattr(generate, "_decoding_threads", lambda model: nullcontext())
            expected = sample_text(
                model, tokenizer, precision, "def ", TOKENS, temperature, top_k, seed, top_p
            )
        capsys.readouterr()
        assert main(_argv(folder, seed, temperature, top_k, top_p)) == 0
        assert capsys.readouterr().out == expected + "\n"


def test_a_small_model_is_sampled_on_one_thread(folders, two_threads, capsys):
    """Every forward of the nano model's sampling runs on one intra-op thread (it ran on all of
    them: 7.5 ms of CPU per 64x64 bf16 linear on a loaded 2-core machine, 0.01 ms on one), and
    the caller's thread count is back afterwards."""
    seen = []

    def record(module, inputs, output):
        seen.append(torch.get_num_threads())

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        assert main(_argv(folders["run"], 1, 0.8, 40, 1.0)) == 0
    finally:
        hook.remove()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
