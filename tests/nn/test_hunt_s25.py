"""Converted layers in more uses (session 25): second derivatives (gradient penalties), layers
without in- or out-features."""

import copy

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.nn import convert

RECIPES = ["fp8-tensorwise", "int8", "mxfp8"]


def converted(recipe, in_features=32, out_features=16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
    convert(model, recipe)
    return model


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_second_derivative_through_a_converted_layer_is_refused_with_the_fix(recipe):
    """PyTorch's once_differentiable refused it with "trying to differentiate twice a function
    that was marked with @once_differentiable", which names neither lowbit nor a fix. The error
    stays a RuntimeError, as PyTorch's autograd errors are."""
    model = torch.nn.Sequential(converted(recipe), torch.nn.Tanh(), converted(recipe, 16, 1))
    x = torch.randn(8, 32, requires_grad=True)
    (grad_x,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(UsageError, match=r"differentiate twice.*fix: .*PATTERN=keep") as error:
        grad_x.pow(2).sum().backward()
    assert isinstance(error.value, RuntimeError)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_gradient_penalty_on_the_last_layer_is_refused_not_dropped(recipe):
    """A layer whose ``grad_out`` needs no graph (the one before ``.sum()``) returned gradients
    without one under once_differentiable: a gradient penalty through it added nothing to the
    weight's gradient, silently (its true second derivative there is not zero)."""
    model = converted(recipe)
    x = torch.randn(8, 32, requires_grad=True)
    out = model(x)
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert grad_x.requires_grad
    with pytest.raises(UsageError, match="differentiate twice"):
        (out.pow(2).sum() + grad_x.pow(2).sum()).backward()


@pytest.mark.parametrize("recipe", RECIPES)
def test_gradients_computed_with_create_graph_equal_the_usual_ones(recipe):
    model = converted(recipe)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    grads = [
        torch.autograd.grad(model(x).pow(2).sum(), [*model.parameters()], create_graph=graph)
        for graph in (False, True)
    ]
    assert all(map(torch.equal, *grads))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-delayed", "mxfp8", "fp8-blockwise"])
def test_a_layer_without_out_features_trains_as_nn_linear(recipe):
    """``nn.Linear(8, 0)`` (a head of no classes) failed in the backward GEMM on the scales of no
    values ("shape '[1, 1]' is invalid for input of size 0", "row scales: 1 or one per row")."""
    linear = torch.nn.Linear(8, 0)
    model = torch.nn.Sequential(copy.deepcopy(linear))
    convert(model, recipe)
    grads = []
    for layer in (model[0], linear):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = layer(x)
        out.sum().backward()
        grads.append((out, x.grad, layer.weight.grad, layer.bias.grad))
    assert all(map(torch.equal, *grads))
