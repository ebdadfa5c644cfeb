"""Small mixture-of-experts models for the tests (transformers' Mixtral and gpt-oss layouts)."""

from __future__ import annotations

import torch


def mixtral_config(**fields):
    """A small Mixtral config: 2 layers of 4 experts, top-2 routing, lowbit's byte vocabulary."""
    from transformers import MixtralConfig

    defaults = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": 257,
    }
    return MixtralConfig(**{**defaults, **fields})


def mixtral(**fields):
    """A freshly initialized (seed 0) small Mixtral causal LM."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(mixtral_config(**fields))


def randomized(experts: torch.nn.Module) -> torch.nn.Module:
    """``experts`` with every Parameter drawn from N(0, 0.1) (seed 0): a standalone experts
    module is built uninitialized (its model initializes it)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.1)
    return experts
