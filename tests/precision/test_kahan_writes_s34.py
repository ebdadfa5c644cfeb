"""Kahan compensation and writes into the 16-bit weights between steps (session 34): the buffer
belongs to the values it compensates, not to whatever the parameter holds next."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision


def _train(precision, model, optimizer, steps, mask=None):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        with precision.autocast():
            loss = F.mse_loss(model(x.to(precision.param_dtype)).float(), y)
        precision.backward(loss)
        if mask is not None:
            model.weight.grad.mul_(mask)
        precision.step(optimizer)
        optimizer.zero_grad()


def _kahan_run():
    torch.manual_seed(0)
    precision = Precision("bf16-pure-kahan")
    model = precision.convert(torch.nn.Linear(64, 64))
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1e-3))
    _train(precision, model, optimizer, 5)
    return precision, model, optimizer


def test_weights_pruned_in_place_stay_zero_under_kahan():
    """Magnitude pruning in place (``weight.mul_(mask)``) with masked gradients: the next step
    added each pruned weight's Kahan buffer (what rounding its old value lost) to its 0, and every
    pruned weight came back non-zero, where master weights (bf16-low) and the other roundings keep
    them 0."""
    precision, model, optimizer = _kahan_run()
    mask = model.weight.detach().abs() > model.weight.detach().abs().median()
    with torch.no_grad():
        model.weight.mul_(mask)
    _train(precision, model, optimizer, 3, mask)
    assert torch.count_nonzero(model.weight[~mask]) == 0
    assert torch.count_nonzero(model.weight[mask]) > 0.9 * mask.sum()


def test_a_rewrite_of_the_same_weights_keeps_the_kahan_buffers():
    """Writing the weights they hold back into them (``model.load_state_dict`` of their own
    state, a resumed run that loads the precision state before the model's) keeps the buffers:
    the run continues bit for bit as the one left alone."""
    precision, model, optimizer = _kahan_run()
    twin = copy.deepcopy((precision, model, optimizer))
    model.load_state_dict(model.state_dict())
    buffer = precision.update.compensation[model.weight]
    assert torch.count_nonzero(buffer) > 0
    _train(precision, model, optimizer, 3)
    _train(*twin, 3)
    assert all(map(torch.equal, model.parameters(), twin[1].parameters()))


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure-sr", "bf16-pure-kahan"])
def test_an_fp64_parameter_beside_a_16_bit_model_steps_in_fp64(recipe):
    """An fp64 parameter added beside the converted model (a temperature, a scale) stepped
    through an fp32 stand-in: updates below fp32's precision were lost, and under bf16-pure-sr its
    values were stochastically rounded to fp16 (70000 held at 65504). It steps as under fp32
    recipes, as plain PyTorch steps it."""
    precision = Precision(recipe)
    model = precision.convert(torch.nn.Linear(4, 4))
    extra = torch.nn.Parameter(torch.tensor([1.0, 1e-6, 7e4], dtype=torch.float64))
    plain = extra.detach().clone().requires_grad_()
    optimizer = precision.wrap_optimizer(torch.optim.SGD([*model.parameters(), extra], lr=1.0))
    for p in (extra, plain):
        p.grad = torch.tensor([1e-9, 1e-9, 1e-3], dtype=torch.float64)
    precision.step(optimizer)
    torch.optim.SGD([plain], lr=1.0).step()
    assert extra.dtype == torch.float64
    assert torch.equal(extra, plain)
