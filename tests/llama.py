"""A tiny Llama checkpoint folder, as `save_pretrained` writes it, for tests of runs trained
from a local --model folder."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def save_llama(folder, seed: int = 0) -> None:
    """A tiny Llama checkpoint folder (weights drawn from ``seed``)."""
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
