"""Sampling from a causal LM (`lowbit.train.generate.sample_text`)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit import Precision
from lowbit.data import build_tokenizer
from lowbit.train.generate import sample_text


def tiny_llama(vocab_size: int, positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=positions,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_ids_past_the_tokenizers_vocabulary_are_never_sampled():
    """A model with more output ids than its tokenizer (a GPT-2 config's 50,257 trained on byte
    tokens) samples only ids the tokenizer decodes, greedy or not."""
    tokenizer = build_tokenizer("byte")
    model = tiny_llama(vocab_size=300, positions=64)
    with torch.no_grad():  # every id the tokenizer has scores 0, the extra ones far above or below
        model.lm_head.weight[: tokenizer.vocab_size] = 0
        model.lm_head.weight[tokenizer.vocab_size :] *= 100
    precision = Precision("fp32")
    for temperature in (0.0, 1.0):
        text = sample_text(model, tokenizer, precision, "ab", 10, temperature, top_k=None)
        assert text.startswith("ab") and len(text) > 2


def test_a_sample_cut_short_by_the_positions_says_so(capsys):
    tokenizer = build_tokenizer("byte")
    model = tiny_llama(vocab_size=257, positions=16)
    sample_text(model, tokenizer, Precision("fp32"), "abcd", 50, 0.0, top_k=None)
    note = capsys.readouterr().err
    assert "the model takes 16 positions and the prompt has 4 tokens: at most 13 new" in note
    sample_text(model, tokenizer, Precision("fp32"), "abcd", 12, 0.0, top_k=None)
    assert capsys.readouterr().err == ""
