"""Mixture-of-experts layers (transformers' 3-D expert weights) converted by `lowbit.convert`."""

import copy
import dataclasses

import pytest
import torch

import lowbit
from lowbit.nn.experts import LowbitExperts, is_experts
from lowbit.nn.linear import LowbitLinear
from lowbit.recipes import get_recipe
from lowbit.recipes.recipe import OperandSpec, uniform_layer
from tests.moe import mixtral, randomized

TOKENS, TOP_K = 24, 2


def _mixtral():
    return mixtral(num_experts_per_tok=TOP_K)


def _gpt_oss_experts():
    """gpt-oss's experts: transposed (in x out) weights, biases, a clamped SwiGLU gate."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(
        hidden_size=64, intermediate_size=48, num_local_experts=4, num_experts_per_tok=TOP_K
    )
    return randomized(GptOssExperts(config))


def _routing(num_experts, hidden=64, seed=1, idle=()):
    """Hidden states and a top-k routing; experts in ``idle`` get no token."""
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(TOKENS, hidden, generator=g)
    scores = torch.randn(TOKENS, num_experts, generator=g)
    scores[:, list(idle)] = -torch.inf
    top_k_weights, top_k_index = scores.softmax(-1).topk(TOP_K, dim=-1)
    return hidden_states, top_k_index, top_k_weights


def _reference(experts, spec, hidden_states, top_k_index, top_k_weights):
    """Every expert as two `LowbitLinear`s of copies of its matrices, tokens gathered with
    ``torch.where``: (output, {parameter name: gradient}) for a sum-of-squares loss."""
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    weights = {name: getattr(experts, name).detach() for name in (up_name, "down_proj")}
    out = torch.zeros_like(hidden_states)
    layers = {}
    for e in range(experts.num_experts):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        for name, w in weights.items():
            w = w[e].t() if experts.is_transposed else w[e]
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=experts.has_bias)
            linear.weight = torch.nn.Parameter(w.clone())
            if experts.has_bias:
                linear.bias = torch.nn.Parameter(
                    getattr(experts, f"{name}_bias")[e].detach().clone()
                )
            layers[name, e] = LowbitLinear(linear, spec)
        h = layers[up_name, e](hidden_states[token])
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        h = layers["down_proj", e](h) * top_k_weights[token, slot, None]
        out = out.index_add(0, token, h)
    out.square().sum().backward()
    grads = {}
    for name, w in weights.items():
        per_expert = []
        for e in range(experts.num_experts):
            g = (
                layers[name, e].weight.grad
                if (name, e) in layers
                else torch.zeros_like(w[e].t() if experts.is_transposed else w[e])
            )
            per_expert.append(g.t() if experts.is_transposed else g)
        grads[name] = torch.stack(per_expert)
    return out.detach(), grads


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-rowwise", "mxfp8"])
@pytest.mark.parametrize("family", ["mixtral", "gpt-oss"])
def test_each_expert_gemm_is_a_lowbit_linear_of_its_matrix(family, recipe):
    experts = _mixtral().model.layers[0].mlp.experts if family == "mixtral" else _gpt_oss_experts()
    assert is_experts(experts)
    spec = get_recipe(recipe).layer
    routing = _routing(experts.num_experts)
    expected, expected_grads = _reference(copy.deepcopy(experts), spec, *routing)
    converted = LowbitExperts(experts, spec)
    out = converted(*routing)
    out.square().sum().backward()
    assert torch.equal(out, expected)
    for name, grad in expected_grads.items():
        assert torch.equal(getattr(experts, name).grad, grad), name


def test_an_expert_without_tokens_gets_a_zero_gradient():
    experts = _mixtral().model.layers[0].mlp.experts
    spec = get_recipe("fp8-tensorwise").layer
    routing = _routing(experts.num_experts, idle=(2,))
    expected, expected_grads = _reference(copy.deepcopy(experts), spec, *routing)
    out = LowbitExperts(experts, spec)(*routing)
    out.square().sum().backward()
    assert torch.equal(out, expected)
    assert torch.equal(experts.down_proj.grad, expected_grads["down_proj"])
    assert not experts.down_proj.grad[2].any() and experts.down_proj.grad[1].any()


def test_a_model_converts_its_experts_and_keeps_its_parameters():
    model = _mixtral()
    names = list(model.state_dict())
    params = dict(model.named_parameters())
    report = lowbit.convert(model, "fp8-tensorwise")
    assert report.converted["model.layers.0.mlp.experts"].endswith("(4 experts)")
    assert isinstance(model.model.layers[1].mlp.experts, LowbitExperts)
    assert list(model.state_dict()) == names  # checkpoints load as before
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizers keep theirs
    layers = lowbit.nn.lowbit_layers(model)
    assert "model.layers.0.mlp.experts.gemms.down.3" in layers  # each expert GEMM's own state


def test_experts_with_an_identity_spec_compute_the_original_model():
    model = _mixtral()
    reference = copy.deepcopy(model)
    identity = uniform_layer(OperandSpec("fp32"))
    lowbit.convert(model, dataclasses.replace(get_recipe("fp8-tensorwise"), layer=identity))
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_a_recipe_that_keeps_a_block_keeps_its_experts():
    # nvfp4 keeps the first and last block: all of this 2-block model
    model = _mixtral()
    report = lowbit.convert(model, "nvfp4")
    assert "model.layers.1.mlp.experts" in report.kept
    assert not isinstance(model.model.layers[1].mlp.experts, LowbitExperts)


def test_an_override_can_name_one_expert_gemm_as_the_doctor_reports_it():
    from lowbit.recipes.recipe import Override

    model = _mixtral()
    recipe = get_recipe("fp8-tensorwise")
    bf16 = uniform_layer(OperandSpec("bf16"))
    gemm = "model.layers.1.mlp.experts.gemms.down.2"
    lowbit.convert(model, recipe.with_overrides(Override(gemm, bf16, "override")))
    layers = lowbit.nn.lowbit_layers(model)
    assert layers[gemm].spec == bf16
    assert layers[gemm].lowbit_state.fixed_operands == set(bf16.operands())  # auto keeps it
    assert layers["model.layers.1.mlp.experts.gemms.down.1"].spec == recipe.layer
    with pytest.raises(lowbit.errors.UsageError, match="keep the whole layer"):
        lowbit.convert(_mixtral(), recipe.with_overrides(Override(gemm, None, "kept")))


def test_experts_converted_by_an_override_under_a_recipe_that_converts_no_layer():
    """bf16-mixed converts no layer; `*experts=fp8-tensorwise` converts only the experts. Each
    expert GEMM read as kept ("the recipe converts no layers") and the conversion was refused as
    if an override kept one GEMM."""
    from lowbit.recipes import parse_override

    recipe = get_recipe("bf16-mixed")
    override = parse_override("*experts=fp8-tensorwise", recipe)
    model = _mixtral()
    report = lowbit.convert(model, recipe.with_overrides(override))
    experts = [name for name in report.converted if name.endswith("mlp.experts")]
    assert len(experts) == 2 and len(report.converted) == 2
    gemm = lowbit.nn.lowbit_layers(model)["model.layers.0.mlp.experts.gemms.up.0"]
    assert gemm.spec == get_recipe("fp8-tensorwise").layer
