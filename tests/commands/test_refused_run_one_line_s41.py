"""Session 41: a run refused for its --model folder says only why, in one line. The note of the
sequence length a folder of 64 positions sets ("no --seq-len given: 64 ...") and the warning of
weights without tokenizer files came first, before the error of weights that were torn or too few
embedding rows for the byte ids; `lowbit estimate` printed its note before refusing an encoder."""

import json

import pytest

from lowbit.cli import main

LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
    "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
    "max_position_embeddings": 64,
}  # fmt: skip


def _llama_weights(folder, vocab_size: int):
    """A saved Llama of 64 positions and ``vocab_size`` rows, without tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**LLAMA, vocab_size=vocab_size)).save_pretrained(folder)
    return folder / "model.safetensors"


@pytest.mark.parametrize(
    ("vocab_size", "torn", "error"),
    [
        (300, True, "model.safetensors: unreadable weights"),
        (100, False, "vocabulary of 100 ids is smaller than the byte tokenizer's 257"),
    ],
)
def test_a_refused_run_of_a_small_folder_prints_its_error_alone(
    tmp_path, capsys, vocab_size, torn, error
):
    weights = _llama_weights(tmp_path / "model", vocab_size)
    if torn:
        weights.write_bytes(weights.read_bytes()[:-10])
    capsys.readouterr()  # save_pretrained's progress bar
    argv = ["train", "--model", str(tmp_path / "model"), "--steps", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: ") and error in lines[0]
    # the refused run's note is not the next command's
    assert main(["estimate", "--model", "nano", "--json"]) == 0
    assert "note" not in capsys.readouterr().err


def test_estimate_of_an_encoder_folder_is_one_line(tmp_path, capsys):
    from transformers import BertConfig

    folder = tmp_path / "bert"
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, architectures=["BertForMaskedLM"],
    )  # fmt: skip
    config.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["max_position_embeddings"] == 64
    assert main(["estimate", "--model", str(folder)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is not a causal language model" in lines[0]
