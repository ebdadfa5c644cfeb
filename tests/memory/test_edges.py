"""`lowbit estimate` on the less common settings: sharding, odd inputs."""

from __future__ import annotations

import pytest

from lowbit.memory.estimate import estimate
from lowbit.models import build_causal_lm


def test_fsdp_estimate_gathers_parameters_in_the_compute_dtype():
    """FSDP2 gathers bf16-mixed's parameters in bf16 (docs/distributed.md), so autocast makes no
    weight copies and the forward runs as bf16-low's: the estimate counted fp32 gathers plus
    autocast's bf16 copies of every weight (12 GiB more per device for llama-7b on 8 GPUs)."""
    mixed = estimate("tiny", "bf16-mixed", "fp32", 4, 32, gpus=2, sharding="fsdp")
    low = estimate("tiny", "bf16-low", "fp32", 4, 32, gpus=2, sharding="fsdp")
    assert (mixed.activations, mixed.temporaries) == (low.activations, low.temporaries)
    # gathered in bf16: the current and the prefetched block, and the root (kept gathered)
    model = build_causal_lm("tiny", 257, seed=0)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - len(model.model.layers) * block
    assert mixed.temporaries == 2 * (2 * block + root)
    fp32 = estimate("tiny", "fp32", "fp32", 4, 32, gpus=2, sharding="fsdp")
    assert fp32.temporaries == 4 * (2 * block + root)


def test_an_mpt_config_is_held_to_its_max_seq_len(tmp_path):
    """MPT bounds its sequence by ``max_seq_len`` (its ALiBi table), not max_position_embeddings:
    a longer --seq failed inside the trace with a message about tracing."""
    import transformers

    from lowbit.errors import UsageError

    config = transformers.MptConfig(
        d_model=32, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=100
    )
    config.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="sequence length 100 exceeds the model's 64 positions"):
        estimate(str(tmp_path / "config.json"), "fp32", seq=100)
