"""Converted layers and recipes at edges a demanding user reaches (session 21's bug hunt)."""

import copy
import io

import pytest
import torch

import lowbit
from lowbit.errors import UsageError
from lowbit.nn import LowbitLinear
from lowbit.recipes import OperandSpec, get_recipe, parse_override
from tests.moe import mixtral


def test_a_layer_applied_at_two_places_is_converted_at_both():
    """``Sequential(lin, act, lin)`` (one layer applied twice) and one layer inside two parents:
    every place holds the one converted layer, none keeps computing in fp32."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    report = lowbit.convert(model, "fp8-tensorwise")
    assert isinstance(model[0], LowbitLinear) and model[2] is model[0]
    assert list(report.converted) == ["0"]
    x = torch.randn(4, 16)
    assert torch.equal(model(x), model[0](torch.tanh(model[0](x))))

    inner = torch.nn.Linear(16, 8)
    nested = torch.nn.Sequential(torch.nn.Sequential(inner), torch.nn.Sequential(inner))
    lowbit.convert(nested, "mxfp8")
    assert isinstance(nested[0][0], LowbitLinear) and nested[1][0] is nested[0][0]


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("operands", ["grad_weight.grad_out:bf16", "forward.x:fp16"])
def test_an_operand_override_keeps_the_recipes_hadamard_transforms(recipe, operands):
    """``OPERAND:FORMAT`` changes those operands only: each GEMM keeps its Hadamard transform and
    its block (nvfp4's 16, mxfp4's 64), which used to fall back to 32."""
    base = get_recipe(recipe).layer
    layer = parse_override(f"*={operands}", get_recipe(recipe)).layer
    for gemm in ("forward", "grad_input", "grad_weight"):
        ours, theirs = getattr(layer, gemm), getattr(base, gemm)
        assert (ours.transform, ours.transform_block) == (theirs.transform, theirs.transform_block)


def test_a_mixture_of_experts_layer_takes_an_empty_batch():
    """No token routed: the converted experts return transformers' empty output and gradient
    (``torch.cat`` of no expert outputs used to fail)."""
    model = mixtral()
    original = copy.deepcopy(model.model.layers[0].mlp.experts)
    lowbit.convert(model, "mxfp8")
    experts = model.model.layers[0].mlp.experts
    top_k_index, top_k_weights = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    for module in (original, experts):
        hidden_states = torch.randn(0, 64, requires_grad=True)
        out = module(hidden_states, top_k_index, top_k_weights)
        out.sum().backward()
        assert out.shape == (0, 64) and out.dtype == torch.float32
        assert hidden_states.grad is not None and hidden_states.grad.shape == (0, 64)


def test_a_scaled_tf32_operand_is_refused_instead_of_giving_nan():
    """tf32 has fp32's range: scaled to its max, two operands' products overflow the fp32 GEMM
    (the layer's output was all NaN). Refused where the spec is written, the override included."""
    with pytest.raises(UsageError, match="tf32 has fp32's range"):
        OperandSpec("tf32")
    with pytest.raises(UsageError, match="tf32 has fp32's range"):
        parse_override("*=forward.x:tf32", get_recipe("fp8-tensorwise"))
    OperandSpec("fp8_e5m2")  # 57344**2 fits fp32


@pytest.mark.parametrize("length", [2.5, True])
def test_an_amax_history_length_that_is_not_a_whole_number_is_refused(length):
    """A history of 2.5 steps failed in the first forward with torch.zeros' TypeError."""
    with pytest.raises(UsageError, match="amax_history must be a positive whole number"):
        OperandSpec("fp8_e4m3", scaling="delayed", amax_history=length)


def test_a_model_saved_whole_after_attention_rerouting_loads_and_runs(monkeypatch):
    """``torch.save(model)`` of a Hugging Face model that `Precision.convert` switched to
    ``lowbit_sdpa`` pickles that name in its config; loaded in a new process (simulated: the name
    unregistered), its forward failed with Transformers' KeyError for an unknown attention."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    from lowbit.nn.attention import ATTENTION_NAME

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        attn_implementation="sdpa",
    )
    precision = lowbit.Precision("mxfp8")
    model = precision.convert(LlamaForCausalLM(config))
    assert model.config._attn_implementation == ATTENTION_NAME
    saved = io.BytesIO()
    torch.save(model, saved)
    for interface in (AttentionInterface, AttentionMaskInterface):
        monkeypatch.delitem(interface._global_mapping, ATTENTION_NAME)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    ids = torch.randint(0, 64, (2, 8))
    with precision.autocast():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
