import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import UsageError
from lowbit.memory import measure, measure_activations
from lowbit.memory.estimate import (
    bytes_per_param_table,
    estimate,
    fits,
    model_state_bytes_per_param,
)
from lowbit.models import build_causal_lm
from lowbit.optim import build_optimizer

DOC = Path(__file__).resolve().parents[2] / "docs" / "memory.md"
# A third shape with grouped-query attention (2 key/value heads for 4 query heads).
THIRD = {
    "model_type": "llama",
    "hidden_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 256,
    "vocab_size": 257,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
RECIPES = [
    ("fp32", "fp32"),
    ("bf16-mixed", "fp32"),
    ("bf16-pure-kahan", "fp32"),
    ("bf16-low", "8bit"),
]
MODEL_STATES = ("parameters", "gradients", "master_weights", "optimizer_states")


@pytest.fixture(scope="module")
def third_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("third") / "config.json"
    path.write_text(json.dumps(THIRD))
    return path


def _model(size, config_path):
    if size != "third":
        return build_causal_lm(size, 257, seed=0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in THIRD.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("recipe, state", RECIPES)
@pytest.mark.parametrize("size", ["tiny", "small", "third"])
def test_estimate_matches_the_measured_run(size, recipe, state, third_config):
    batch, seq = 2, 64
    model = _model(size, third_config)
    precision = lowbit.Precision(recipe)
    model = precision.convert(model)
    optimizer = precision.wrap_optimizer(
        build_optimizer(model.parameters(), lr=1e-3, state_precision=state)
    )
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 257, (batch, seq + 1), generator=generator)
    x, y = windows[:, :-1], windows[:, 1:]  # as the trainer's batches (`LMBatches`)

    def forward():
        with precision.autocast():
            logits = model(x).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    precision.backward(forward())  # one real step creates states and master weights
    precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    saved = measure_activations(model, forward)
    precision.backward(forward())
    measured = measure(model, optimizer, precision)
    assert not measured.notes

    config = third_config if size == "third" else size
    estimated = estimate(config, recipe, state, batch, seq)
    for name in MODEL_STATES:
        assert getattr(estimated, name) == getattr(measured, name), name
    assert estimated.num_params == measured.num_params
    # traced on fake tensors: byte for byte what the live forward saves
    assert estimated.activations == saved.activations
    assert estimated.temporaries == saved.temporaries
    if recipe == "bf16-mixed":  # autocast's bf16 copies of every linear weight
        assert saved.temporaries > 0


# Small configs of other families: GPT-2 (transformers' Conv1D, LayerNorm, GELU, learned positions),
# Falcon (FalconLinear, fused query-key-value, rotary), BLOOM (no SDPA: eager attention, ALiBi) and
# Mixtral.
FAMILIES = {
    "gpt2": {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 128},
    "falcon": {
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "new_decoder_architecture": False,
        "multi_query": True,
    },
    "bloom": {"hidden_size": 64, "n_layer": 3, "n_head": 4},
    # mixture of experts: a router (a Parameter read by F.linear, not an nn.Linear) and experts
    # multiplied by grouped GEMMs
    "mixtral": {
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
}


def _family_config(tmp_path, family):
    path = tmp_path / family / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"model_type": family, "vocab_size": 257, **FAMILIES[family]}))
    return path


def _saved_bytes(model, precision, batch, seq):
    """What the live forward and loss save for the backward (`measure_activations`)."""
    windows = torch.randint(0, 257, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = windows[:, :-1], windows[:, 1:]

    def forward():
        with precision.autocast():
            logits = model(input_ids=x, use_cache=False).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return measure_activations(model, forward)


@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_estimate_traces_any_causal_lm_family(tmp_path, family, recipe):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.models.pretrained import with_sdpa

    path = _family_config(tmp_path, family)
    config = AutoConfig.from_pretrained(path.parent)
    torch.manual_seed(0)

    def build(**kw):  # a fresh config per attempt: a refused SDPA attempt leaves its choice in it
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), **kw)

    model = with_sdpa(build).train()
    precision = lowbit.Precision(recipe)
    model = precision.convert(model)
    saved = _saved_bytes(model, precision, 2, 32)
    estimated = estimate(path, recipe, "fp32", 2, 32)
    assert estimated.num_params == sum(p.numel() for p in model.parameters())
    # The real grouped GEMM also saves its per-expert offsets (a few int32s per layer); the
    # trace runs transformers' fallback op (the same input and weights), which keeps them on ctx.
    offsets = 4 * 4 * 3 if family == "mixtral" else 0
    assert saved.activations - offsets <= estimated.activations <= saved.activations
    assert estimated.temporaries == saved.temporaries
    if recipe == "bf16-mixed":  # the layers' bf16 weight copies, Conv1D and FalconLinear included
        assert saved.temporaries > 0


@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed"])
def test_checkpointed_estimate_is_the_checkpointed_run_plus_one_block(recipe):
    """With one checkpoint per block the forward saves each block's input and what lies outside
    the blocks (autocast's weight copies inside a block are made again when it is recomputed);
    the estimate adds one block's saved tensors, rebuilt while its backward runs."""
    batch, seq = 2, 64
    plain = estimate("tiny", recipe, "fp32", batch, seq)
    ckpt = estimate("tiny", recipe, "fp32", batch, seq, activation_checkpointing=True)
    model = build_causal_lm("tiny", 257, seed=0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(model).train()
    full = _saved_bytes(model, precision, batch, seq)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    kept = _saved_bytes(model, precision, batch, seq)
    assert (plain.activations, plain.temporaries) == (full.activations, full.temporaries)
    # 4 equal blocks: what one of them saves
    one_block = ckpt.activations - kept.activations
    assert 0 < one_block < (full.activations - kept.activations) / 3
    one_block_copies = ckpt.temporaries - kept.temporaries
    assert 0 <= one_block_copies <= (full.temporaries - kept.temporaries) / 3
    if recipe == "bf16-mixed":
        assert kept.temporaries > 0 and one_block_copies > 0  # the head's copy; a block's


def test_converted_experts_keep_quantized_inputs_and_weights(tmp_path):
    # fp8-tensorwise converts every expert GEMM (lowbit.nn.experts): each keeps its input and
    # weight in fp8, 1 byte a value, and gives its output in bf16 (autocast's dtype), where the
    # same layer kept in high precision saves its inputs in fp32, computes in fp32 and makes no
    # weight copy (transformers' grouped GEMM is not autocast's).
    from lowbit.recipes import get_recipe
    from lowbit.recipes.recipe import Override

    path = _family_config(tmp_path, "mixtral")
    converted = estimate(path, "fp8-tensorwise", "fp32", 2, 32)
    kept = get_recipe("fp8-tensorwise").with_overrides(Override("*.experts", None, "kept"))
    kept = estimate(path, kept, "fp32", 2, 32)
    mixtral = FAMILIES["mixtral"]
    experts = 3 * mixtral["hidden_size"] * mixtral["intermediate_size"]  # up (2 I x H), down
    weights = mixtral["num_hidden_layers"] * mixtral["num_local_experts"] * experts
    assert converted.temporaries - kept.temporaries == weights
    routed = 2 * 32 * mixtral["num_experts_per_tok"]  # (token, expert) rows per layer
    hidden, inner = mixtral["hidden_size"], mixtral["intermediate_size"]
    # per routed row, bytes kept - converted: the up GEMM's input (4 - 1) x H, its gate-and-up
    # output saved by the activation (4 - 2) x 2I, the activation's output (4 - 2) x I, the down
    # GEMM's input (4 - 1) x I, its output saved by the routing weights' product (4 - 2) x H
    per_row = 3 * hidden + 2 * 2 * inner + 2 * inner + 3 * inner + 2 * hidden
    assert kept.activations - converted.activations == (
        mixtral["num_hidden_layers"] * routed * per_row
    )


def test_fp16_recipes_are_estimated_as_a_gpu_runs_them():
    # On a GPU fp16 autocast (or fp16 parameters) computes the GEMMs; the CPU's fp16 emulation
    # layers are not part of the estimate: 16-bit activations and copies cost what bf16's do.
    for fp16, bf16 in (("fp16-mixed", "bf16-mixed"), ("fp16-low", "bf16-low")):
        a, b = estimate("small", fp16, "fp32", 2, 128), estimate("small", bf16, "fp32", 2, 128)
        assert (a.activations, a.temporaries) == (b.activations, b.temporaries)
    assert estimate("small", "fp16-low", "fp32", 2, 128).temporaries == 0  # no weight casts


def test_classic_mixed_precision_is_16_bytes_per_parameter():
    # ZeRO (Rajbhandari et al. 2020), section 3.1: fp16 params 2 + fp16 grads 2 + fp32 master
    # weights 4 + Adam's fp32 momentum and variance 8 = 16 bytes per parameter.
    assert model_state_bytes_per_param("fp16-low", "fp32") == 16
    per_param = estimate("llama-7b", "fp16-low", "fp32", 1, 128).per_param()
    assert per_param["model_states"] == pytest.approx(16, abs=1e-4)
    assert model_state_bytes_per_param("bf16-pure", "fp32") == 12
    assert model_state_bytes_per_param("bf16-pure-kahan", "bf16") == 10


def _doc_table() -> dict[str, list[float]]:
    rows = {}
    text = DOC.read_text()
    for line in text[text.index("## Bytes per parameter") :].splitlines():
        match = re.match(r"\| `([\w.-]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [float(v) for v in match.group(2).split("|")]
    return rows


def test_docs_table_is_the_estimators():
    doc = _doc_table()
    code = {}
    for line in bytes_per_param_table().splitlines()[2:]:
        match = re.match(r"\| `([\w.-]+)` \|(.*)\|$", line)
        code[match.group(1)] = [float(v) for v in match.group(2).split("|")]
    core = {"fp32", "bf16-mixed", "fp16-mixed", "fp16-low", "bf16-low", "bf16-pure"}
    core |= {"bf16-pure-sr", "bf16-pure-kahan", "fp8-tensorwise", "fp8-rowwise", "int8"}
    assert core <= set(doc)
    for name, values in doc.items():
        assert values == code[name], f"{name}: docs/memory.md is stale; regenerate the table"
    assert "Rajbhandari" in DOC.read_text()


def test_sharding_checkpointing_and_fits():
    plain = estimate("llama-1b", "bf16-low", "8bit", 2, 2048)
    sharded = estimate("llama-1b", "bf16-low", "8bit", 2, 2048, gpus=8, sharding="fsdp")
    for name in MODEL_STATES:  # the first rank's shards: an even split, or a little more
        even = -(-getattr(plain, name) // 8)
        assert even <= getattr(sharded, name) <= even * 1.001  # (per-tensor code maps, padding)
    assert sharded.activations == plain.activations
    ckpt = estimate("llama-1b", "bf16-low", "8bit", 2, 2048, activation_checkpointing=True)
    assert ckpt.activations < plain.activations / 3
    # 7B in fp32 with fp32 Adam needs 16 B/param = 108 GB of model states: not on 80 GB
    assert fits("llama-7b", "fp32", "fp32", 1024, 80 * 2**30) == 0
    small_gpu = fits("llama-1b", "bf16-low", "8bit", 2048, 24 * 2**30)
    large_gpu = fits("llama-1b", "bf16-low", "8bit", 2048, 80 * 2**30)
    assert 0 < small_gpu < large_gpu
    assert estimate("llama-1b", "bf16-low", "8bit", large_gpu, 2048).total <= 80 * 2**30
    assert estimate("llama-1b", "bf16-low", "8bit", large_gpu + 1, 2048).total > 80 * 2**30


def test_bad_inputs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="nothing at that path, nor a model size"):
        estimate(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="exceeds"):
        estimate("tiny", seq=4096)
    with pytest.raises(UsageError, match="sharding"):
        estimate("tiny", sharding="zero9")
    t5 = tmp_path / "t5.json"
    t5.write_text(json.dumps({"model_type": "t5", "d_model": 64, "num_layers": 2}))
    with pytest.raises(UsageError, match="not a causal language model config"):
        estimate(t5)
