"""Session 30: `lowbit eval`'s progress (a whole split ran minutes without a word) and
`lowbit generate`'s room at the model's position limit."""

import io
import json
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit import Precision
from lowbit.cli import main
from lowbit.data import build_tokenizer, eval_batches
from lowbit.errors import UsageError
from lowbit.train import load_run
from lowbit.train import trainer as trainer_module
from lowbit.train.generate import sample_text

# 270 validation images in batches of 2: 135 batches, a large split that evaluates in a second
DIGITS = ["--task", "image-classification", "--batch-size", "2", "--steps", "1", "--quiet"]
NOTE = "evaluating the whole validation split: 135 batches of 2; --max-batches N bounds it to N"


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's is."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval_progress") / "digits"
    assert main(["train", *DIGITS, "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval_progress") / "lm"
    argv = ["train", "--model", "nano", "--seq-len", "16", "--batch-size", "4", "--steps", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "SAMPLE_TOKENS", 8)
        assert main([*argv, "--eval-batches", "1", "--quiet", "--out", str(run)]) == 0
    return run


def test_eval_of_a_large_split_says_how_many_batches_and_how_to_bound_them(digits_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(digits_run)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"lowbit: note: {NOTE}\n"  # no bar: stderr is no terminal here
    assert "per-label:" in captured.out
    for bounded in (["--max-batches", "135"], ["--quiet"]):
        assert main(["eval", str(digits_run), *bounded]) == 0
        assert capsys.readouterr().err == ""


def test_eval_on_a_terminal_shows_a_bar_and_the_same_metrics(digits_run, capsys, monkeypatch):
    capsys.readouterr()
    assert main(["eval", str(digits_run), "--json", "--quiet"]) == 0
    quiet = capsys.readouterr()
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["eval", str(digits_run), "--json"]) == 0
    shown = capsys.readouterr().out
    assert shown == quiet.out and json.loads(shown)["accuracy"] >= 0  # one JSON line, unchanged
    assert NOTE in terminal.getvalue() and "135/135" in terminal.getvalue()


def test_eval_of_a_quantized_folder_counts_the_model_and_its_reference(
    digits_run, tmp_path, capsys, monkeypatch
):
    """`compare` runs the batches once through each model, the folder's and its reference
    (metrics and per-label F1 from the one pass): 2 x 135."""
    folder = tmp_path / "int8"
    assert main(["quantize", str(digits_run), "--to", "int8", "--out", str(folder)]) == 0
    capsys.readouterr()
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["eval", str(folder)]) == 0
    assert "135 batches of 2, through the model and its reference" in terminal.getvalue()
    assert "270/270" in terminal.getvalue()


def test_eval_bar_of_a_causal_lm_counts_its_batches(lm_run, capsys, monkeypatch):
    from lowbit.train.evaluate import eval_batch_count

    loaded = load_run(lm_run)
    tokens = loaded.task.tokens("validation")
    for bound in (None, 3):  # the whole built-in validation split: 14,325 batches of 4 x 16
        assert eval_batch_count(loaded.task, "validation", bound) == len(
            eval_batches(tokens, 4, 16, bound)
        )
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    capsys.readouterr()
    assert main(["eval", str(lm_run), "--max-batches", "3"]) == 0
    assert "3/3" in terminal.getvalue() and "note" not in terminal.getvalue()
    assert "tokens 192" in capsys.readouterr().out  # 3 batches of 4 x 16


def tiny_llama(positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=positions,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _forwards(model) -> list[int]:
    """The input length of each forward call of ``model``, as it runs."""
    lengths: list[int] = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    return lengths


def _decoded(tokenizer) -> list[list[int]]:
    """The ids of each `decode` call of ``tokenizer`` (the prompt's, then the prompt's and the new
    ones): a byte tokenizer's sample is no valid UTF-8, and its text encodes to other ids."""
    calls: list[list[int]] = []
    decode = tokenizer.decode
    tokenizer.decode = lambda ids: calls.append(list(ids)) or decode(ids)
    return calls


def test_generation_fills_every_position_of_the_model(capsys):
    """16 positions and a 4-token prompt: the forwards cover positions 0..15 (the prompt's 4,
    then 12 new tokens fed back), and the 13th new token, sampled from position 15, is never fed
    back: 16 - 4 + 1 = 13 new tokens, not 12."""
    tokenizer = build_tokenizer("byte")
    model = tiny_llama(positions=16)
    lengths, decoded = _forwards(model), _decoded(tokenizer)
    sample_text(model, tokenizer, Precision("fp32"), "abcd", 50, 0.0, top_k=None)
    assert sum(lengths) == 16 and len(lengths) == 13  # every position, none past the limit
    assert len(decoded[-1]) == 4 + 13
    assert "at most 13 new tokens, not 50" in capsys.readouterr().err


def test_a_prompt_at_the_position_limit_is_taken(capsys):
    tokenizer = build_tokenizer("byte")
    model = tiny_llama(positions=16)
    prompt, decoded = "a" * 16, _decoded(tokenizer)
    assert sample_text(model, tokenizer, Precision("fp32"), prompt, 0, 0.0) == prompt
    assert capsys.readouterr().err == ""
    text = sample_text(model, tokenizer, Precision("fp32"), prompt, 5, 0.0, top_k=None)
    assert text.startswith(prompt) and len(decoded[-1]) == 17
    assert "the prompt has 16 tokens: at most 1 new token, not 5" in capsys.readouterr().err
    with pytest.raises(UsageError, match="the prompt has 17 tokens, the model takes 16"):
        sample_text(model, tokenizer, Precision("fp32"), prompt + "a", 0, 0.0)
