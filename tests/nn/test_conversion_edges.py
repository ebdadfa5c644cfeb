"""Converted layers at the edges of what their originals take: float64, double backward, layers
whose weight a hook computes, and hooks registered on a layer before it is converted."""

import copy

import pytest
import torch

from lowbit import convert, get_recipe
from lowbit.nn import LowbitConv2d, LowbitLinear
from lowbit.recipes import parse_override


def _fp32_override():
    recipe = get_recipe("fp32")
    return recipe.with_overrides(parse_override("*=fp32", recipe))


@pytest.mark.parametrize(
    ("layer", "shape"),
    [(torch.nn.Linear(24, 12), (5, 24)), (torch.nn.Conv2d(3, 6, 3, padding=1), (2, 3, 7, 7))],
)
def test_an_fp32_spec_leaves_a_float64_layer_exact(layer, shape):
    """fp32 operands are a floor: a float64 layer keeps computing in float64, bit for bit."""
    layer = copy.deepcopy(layer).double()
    model = torch.nn.Sequential(copy.deepcopy(layer))
    assert list(convert(model, _fp32_override()).converted) == ["0"]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = model(x), layer(x_ref)
    grad = torch.randn_like(out_ref)
    out.backward(grad)
    out_ref.backward(grad)
    assert out.dtype == torch.float64 and torch.equal(out, out_ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(model[0].weight.grad, layer.weight.grad)
    assert torch.equal(model[0].bias.grad, layer.bias.grad)


@pytest.mark.parametrize("recipe", ["fp16-mixed", "fp8-tensorwise", "int8"])
def test_a_double_backward_through_a_quantized_layer_is_refused(recipe):
    """Quantization has no derivative: a gradient penalty through a quantized layer raises instead
    of returning a second derivative that treats the quantized operands as constants."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    convert(model, recipe)
    x = torch.randn(8, 32, requires_grad=True)
    out = model(x)
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (out.sum() + grad_x.pow(2).sum()).backward()


def test_an_fp32_spec_keeps_the_double_backward_of_f_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    model = torch.nn.Sequential(copy.deepcopy(linear))
    convert(model, _fp32_override())
    grads = []
    for layer in (model[0], linear):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (grad_x,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
        grad_x.pow(2).sum().backward()
        grads.append(layer.weight.grad)
    assert torch.equal(*grads)


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated")
@pytest.mark.parametrize(
    "wrap", [torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm], ids=["weight", "spectral"]
)
def test_a_layer_whose_weight_a_hook_computes_is_kept(wrap):
    """weight_norm / spectral_norm recompute ``weight`` from other Parameters before each forward:
    swapping the layer would drop those Parameters from the model and freeze its weight."""

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            wrap(torch.nn.Conv2d(3, 8, 1)), torch.nn.Flatten(), wrap(torch.nn.Linear(8, 4))
        )

    plain, model = build(), build()
    report = convert(model, "fp8-tensorwise")
    assert list(report.converted) == [] and set(report.kept) == {"0", "2"}
    assert "computed by a hook" in report.kept["0"]
    assert sorted(model.state_dict()) == sorted(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    model(torch.randn(5, 3, 1, 1)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_hooks_registered_on_a_layer_run_on_its_converted_layer():
    linear, conv = torch.nn.Linear(16, 8), torch.nn.Conv2d(3, 4, 3)
    seen = []
    handles = [
        linear.register_forward_pre_hook(lambda module, args: seen.append("pre")),
        linear.register_forward_hook(lambda module, args, out: seen.append(("out", out.shape))),
        conv.register_full_backward_hook(lambda module, gin, gout: seen.append("backward")),
    ]
    model = torch.nn.Sequential(linear, torch.nn.Sequential(conv))
    convert(model, "fp8-tensorwise")
    assert isinstance(model[0], LowbitLinear) and isinstance(model[1][0], LowbitConv2d)
    model[0](torch.randn(2, 16))
    model[1](torch.randn(2, 3, 5, 5, requires_grad=True)).sum().backward()
    assert seen == ["pre", ("out", (2, 8)), "backward"]
    for handle in handles:  # the handles still remove what they registered
        handle.remove()
    model[0](torch.randn(2, 16))
    assert len(seen) == 3


def test_a_converted_conv2d_has_the_attributes_of_an_nn_conv2d():
    conv = torch.nn.Conv2d(3, 8, (3, 5), stride=2, padding=1, dilation=(1, 2))
    model = torch.nn.Sequential(copy.deepcopy(conv))
    convert(model, "fp8-tensorwise")
    assert isinstance(model[0], LowbitConv2d)
    for name in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(model[0], name) == getattr(conv, name), name
