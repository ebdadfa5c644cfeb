"""`Precision` in more loops users write (session 26): a second step without a backward, two
optimizers in the DCGAN order, what is not an optimizer or a precision state, a wrapped
optimizer's own step."""

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


@pytest.mark.parametrize("clip", [False, True], ids=["", "clipped"])
@pytest.mark.parametrize("recipe", ["fp32", "fp16-mixed"])
def test_a_second_step_without_a_backward_steps_the_same_gradients_again(recipe, clip):
    """Under loss scaling the fp32 parameters' gradients are unscaled in place; a second
    ``precision.step`` without a backward divided them by the scale once more, so the second
    step moved the weights 65536 times less than plain PyTorch's second step does. Clipping
    before the first step (which writes into the gradients) changes nothing of that."""
    ((x, y),) = batches(1)
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    backward(precision, model, x, y)
    if clip:
        precision.clip_grad_norm_(optimizer, 1e9)
    assert precision.step(optimizer)
    plain = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for copy, p in zip(plain, model.parameters()):
        copy.grad = p.grad.clone()
    torch.optim.SGD(plain, lr=0.1).step()
    assert precision.step(optimizer)
    assert all(map(torch.equal, model.parameters(), plain))


def test_a_second_step_of_16_bit_parameters_without_a_backward_steps_the_same_gradients():
    """fp16-low steps fresh fp32 copies of the 16-bit gradients, scaled: divided each time."""
    ((x, y),) = batches(1)
    precision = Precision("fp16-low")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    backward(precision, model, x, y)
    assert precision.step(optimizer)
    stepped = precision.unscale_(optimizer)  # the masters, with the gradients the step takes
    plain = [t.detach().clone().requires_grad_() for t in stepped]
    for copy, t in zip(plain, stepped):
        copy.grad = t.grad.clone()
    torch.optim.SGD(plain, lr=0.1).step()
    assert precision.step(optimizer)
    assert all(map(torch.equal, precision.unscale_(optimizer), plain))


def test_two_optimizers_in_the_dcgan_order_step_as_with_gradscaler():
    """The generator's backward goes through the discriminator, whose gradients its own step
    has unscaled already, and which are zeroed before they are used again (PyTorch's DCGAN
    example): GradScaler takes this loop, and so does the precision."""
    ((x, _),) = batches(1)
    precision = Precision("fp16-mixed")
    generator, critic = precision.convert(mlp()), precision.convert(mlp())
    opt_g = precision.wrap_optimizer(torch.optim.SGD(generator.parameters(), lr=0.1))
    opt_c = precision.wrap_optimizer(torch.optim.SGD(critic.parameters(), lr=0.1))
    for _ in range(2):
        opt_c.zero_grad()
        with precision.autocast():
            loss_c = critic(generator(x).detach().float().softmax(-1) @ torch.eye(x.shape[1])[:10])
        precision.backward(loss_c.float().square().mean())
        assert precision.step(opt_c)
        opt_g.zero_grad()
        with precision.autocast():
            loss_g = critic(generator(x).float().softmax(-1) @ torch.eye(x.shape[1])[:10])
        precision.backward(loss_g.float().square().mean())
        assert precision.step(opt_g)
    assert all(torch.isfinite(p).all() for p in [*generator.parameters(), *critic.parameters()])


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


def test_an_optimizer_without_step_hooks_is_still_wrapped():
    """A user's duck-typed optimizer (or a wrapper that skips ``Optimizer.__init__``) failed in
    `wrap_optimizer` with an AttributeError once the step guard was registered on it."""

    class Mine:
        def __init__(self, params):
            self.param_groups = [{"params": list(params), "lr": 0.1}]
            self.state = {}

        def step(self):
            for p in self.param_groups[0]["params"]:
                p.data.add_(p.grad, alpha=-0.1)

        def zero_grad(self):
            for p in self.param_groups[0]["params"]:
                p.grad = None

    ((x, y),) = batches(1)
    precision = Precision("fp16-mixed")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(Mine(model.parameters()))
    backward(precision, model, x, y)
    assert precision.step(optimizer)


def test_a_new_precision_for_the_same_optimizer_replaces_the_old_ones_guard():
    """The first precision's guard, left on the optimizer, refused the second one's own steps."""
    ((x, y),) = batches(1)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = Precision("fp16-mixed")
    first.wrap_optimizer(optimizer)
    second = Precision("fp16-mixed")
    model = second.convert(model)
    second.wrap_optimizer(optimizer)
    backward(second, model, x, y)
    assert second.step(optimizer)
    assert first is not None  # alive while the second steps
