"""Session 24's hunt through converted Conv2d and mixture-of-experts layers, as users call them."""

import copy
import re

import pytest
import torch
from torch import nn

from lowbit import convert
from lowbit.errors import UsageError
from lowbit.formats.error import sqnr
from lowbit.nn.experts import LowbitExperts
from lowbit.recipes import get_recipe, parse_override
from lowbit.recipes.recipe import OperandSpec, uniform_layer
from tests.moe import mixtral

NO_EXPERT = 4  # transformers' id for a row routed to no expert: num_experts


def _experts_and_routing():
    """The first Mixtral layer's 4 experts (eager implementation) and a top-2 routing of 6 tokens
    in which token 1's second slot and both of token 3's go to no expert."""
    experts = mixtral().model.layers[0].mlp.experts
    experts.config._experts_implementation = "eager"
    g = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(6, 64, generator=g)
    top_k_weights, top_k_index = torch.randn(6, 4, generator=g).softmax(-1).topk(2, dim=-1)
    top_k_index[1, 1] = NO_EXPERT
    top_k_index[3] = NO_EXPERT
    return experts, hidden_states, top_k_index, top_k_weights


def _forward_backward(experts, hidden_states, top_k_index, top_k_weights):
    hidden_states = hidden_states.clone().requires_grad_()
    out = experts(hidden_states, top_k_index, top_k_weights)
    out.square().sum().backward()
    return out.detach(), hidden_states.grad, experts.down_proj.grad


@pytest.mark.parametrize(("recipe", "floor"), [("fp32", None), ("fp8-tensorwise", 20)])
def test_a_row_routed_to_no_expert_adds_nothing_as_in_transformers(recipe, floor):
    experts, *routing = _experts_and_routing()
    expected = _forward_backward(copy.deepcopy(experts), *routing)
    spec = uniform_layer(OperandSpec("fp32")) if recipe == "fp32" else get_recipe(recipe).layer
    got = _forward_backward(LowbitExperts(experts, spec), *routing)
    for want, have in zip(expected, got):
        if floor is None:
            torch.testing.assert_close(have, want, rtol=0, atol=1e-6)
        else:
            assert sqnr(want, have) > floor
    out, grad_hidden, _ = got
    assert not out[3].any() and not grad_hidden[3].any()  # token 3 went to no expert


def test_a_batch_routed_entirely_to_no_expert_gives_zeros():
    experts, hidden_states, top_k_index, top_k_weights = _experts_and_routing()
    top_k_index[:] = NO_EXPERT
    out, grad_hidden, grad_down = _forward_backward(
        LowbitExperts(experts, get_recipe("fp8-tensorwise").layer),
        hidden_states,
        top_k_index,
        top_k_weights,
    )
    assert out.shape == hidden_states.shape and not out.any()
    assert not grad_hidden.any() and not grad_down.any()


def test_an_expert_id_past_the_no_expert_id_is_refused_in_one_line():
    experts, hidden_states, top_k_index, top_k_weights = _experts_and_routing()
    top_k_index[0, 0] = NO_EXPERT + 1
    converted = LowbitExperts(experts, get_recipe("fp8-tensorwise").layer)
    with pytest.raises(UsageError, match=r"expert id 5, but the layer has 4 experts; fix: route"):
        converted(hidden_states, top_k_index, top_k_weights)


def _input_grad(model, x, grad):
    x = x.clone().requires_grad_()
    model(x).backward(grad)
    return x.grad.double()


def test_a_bf16_convolutions_input_gradient_sums_each_kernel_window_in_fp32():
    """Each pixel's input gradient sums the 25 positions of a 5x5 kernel that read it: in fp32,
    rounded once, as nn.Conv2d's bf16 kernel sums it (in bf16 it lost 7 dB)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(16, 16, 5, padding=2, bias=False))
    x, grad = torch.randn(4, 16, 16, 16), torch.randn(4, 16, 16, 16)
    exact = _input_grad(copy.deepcopy(plain).double(), x.double(), grad.double())
    recipe = get_recipe("fp8-tensorwise")
    model = copy.deepcopy(plain)
    convert(model, recipe.with_overrides(parse_override("0=bf16-mixed", recipe)))
    converted = _input_grad(model.bfloat16(), x.bfloat16(), grad.bfloat16())
    expected = _input_grad(plain.bfloat16(), x.bfloat16(), grad.bfloat16())
    assert converted.dtype == expected.dtype
    assert sqnr(exact, converted) > sqnr(exact, expected) - 2  # 49.6 and 50.8 dB


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (dict(kernel_size=5), (1, 4, 3, 3)),
        (dict(kernel_size=3, dilation=(1, 2), padding=(0, 1)), (4, 2, 4)),
    ],
)
def test_an_image_smaller_than_the_kernel_is_refused_with_nn_conv2ds_message(conv, shape):
    plain = nn.Sequential(nn.Conv2d(4, 6, **conv))
    model = copy.deepcopy(plain)
    convert(model, "fp8-tensorwise")
    x = torch.randn(shape)
    with pytest.raises(RuntimeError) as expected:
        plain(x)
    assert "Kernel size can't be greater than actual input size" in str(expected.value)
    with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
        model(x)
