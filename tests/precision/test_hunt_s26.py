"""`Precision` in more loops users write (session 26): a second step without a backward, a
backward onto the gradients a step left."""

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision
from lowbit.errors import UsageError
from tests.precision.test_precision import batches, mlp


def backward(precision, model, x, y):
    with precision.autocast():
        loss = F.cross_entropy(model(x.to(precision.param_dtype)).float(), y)
    precision.backward(loss)


@pytest.mark.parametrize("recipe", ["fp32", "fp16-mixed"])
def test_a_second_step_without_a_backward_steps_the_same_gradients_again(recipe):
    """Under loss scaling the fp32 parameters' gradients are unscaled in place; a second
    ``precision.step`` without a backward divided them by the scale once more, so the second
    step moved the weights 65536 times less than plain PyTorch's second step does."""
    ((x, y),) = batches(1)
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    backward(precision, model, x, y)
    assert precision.step(optimizer)
    plain = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for copy, p in zip(plain, model.parameters()):
        copy.grad = p.grad.clone()
    torch.optim.SGD(plain, lr=0.1).step()
    assert precision.step(optimizer)
    assert all(map(torch.equal, model.parameters(), plain))


def test_a_backward_onto_the_gradients_a_step_unscaled_is_refused():
    """Without ``zero_grad`` after the step, new (scaled) gradients would land on the unscaled
    ones, and the next step would divide the old ones by the scale (GradScaler's silent result);
    zeroed gradients, or ones set to None, take the next backward."""
    (x, y), (x2, y2) = batches(2)
    precision = Precision("fp16-mixed")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    backward(precision, model, x, y)
    precision.step(optimizer)
    with pytest.raises(UsageError, match="zero_grad"):
        backward(precision, model, x2, y2)
    optimizer.zero_grad(set_to_none=False)
    backward(precision, model, x2, y2)
    assert precision.step(optimizer)


@pytest.mark.parametrize("recipe", ["fp32", "bf16-low"])
def test_what_is_not_an_optimizer_is_refused_by_wrap_optimizer(recipe):
    """``wrap_optimizer(model.parameters())`` (or the class, or a list of optimizers) was taken:
    under 16-bit parameters it failed with an AttributeError, elsewhere the next `state_dict`
    did."""
    precision = Precision(recipe)
    model = precision.convert(mlp())
    for given in (
        model.parameters(),
        torch.optim.AdamW,
        [torch.optim.SGD(model.parameters(), lr=0.1)],
    ):
        with pytest.raises(UsageError, match=r"wrap_optimizer\(\) takes an optimizer"):
            precision.wrap_optimizer(given)
    assert precision.state_dict()["params_per_optimizer"] == []


def test_a_state_that_is_not_a_precision_state_is_refused_in_one_line():
    """A whole checkpoint, or the model's state, given to `load_state_dict` failed with
    ``KeyError: 'scaler'``."""
    precision = Precision("bf16-low")
    model = mlp()
    for state in ({"model": model.state_dict()}, model.state_dict(), None):
        with pytest.raises(UsageError, match=r"takes what precision\.state_dict\(\) returned"):
            precision.load_state_dict(state)
    precision.load_state_dict(Precision("bf16-low").state_dict())


@pytest.mark.parametrize(
    "recipe, refused",
    [("bf16-mixed", False), ("fp16-mixed", True), ("bf16-low", True), ("fp8-delayed", True)],
)
def test_a_wrapped_optimizers_own_step_is_refused_where_it_would_step_otherwise(recipe, refused):
    """``optimizer.step()`` instead of ``precision.step(optimizer)`` applied loss-scaled gradients
    (fp16-mixed), stepped the bf16 weights with bf16 moments and left the master weights behind
    (bf16-low), or never moved fp8-delayed's amax histories, all silently; where the recipe
    steps as plain PyTorch (bf16-mixed) it stays allowed."""
    ((x, y),) = batches(1)
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    backward(precision, model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    if refused:
        with pytest.raises(UsageError, match=r"fix: precision.step\(optimizer\)"):
            optimizer.step()
        assert all(map(torch.equal, model.parameters(), before)) and not optimizer.state
    else:
        optimizer.step()
    assert precision.step(optimizer)
