"""`Precision` in more loops users write: closures (LBFGS), sparse gradients, param groups added
after a resume, hand clipping of the wrong tensors, ``zero_grad(set_to_none=False)``, a precision
state of another recipe."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision
from lowbit.errors import UsageError
from tests.precision.test_user_loops import batch, mlp


def forward(precision, model, seed=1):
    x, y = batch(seed)
    with precision.autocast():
        return F.cross_entropy(model(x.to(precision.param_dtype)).float(), y)


@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed"])
def test_a_closure_steps_lbfgs_as_plain_pytorch(recipe):
    """``precision.step(optimizer, closure)``: the closure reaches the optimizer's step."""
    x, y = batch()
    reference = mlp()
    plain = torch.optim.LBFGS(reference.parameters(), max_iter=4)

    def plain_closure():
        plain.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe == "bf16-mixed"):
            loss = F.cross_entropy(reference(x).float(), y)
        loss.backward()
        return loss

    plain.step(plain_closure)

    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.LBFGS(model.parameters(), max_iter=4))

    def closure():
        optimizer.zero_grad()
        loss = forward(precision, model)
        precision.backward(loss)
        return loss

    assert precision.step(optimizer, closure)
    assert all(map(torch.equal, model.parameters(), reference.parameters()))


@pytest.mark.parametrize("recipe", ["fp16-mixed", "bf16-low", "bf16-pure-sr"])
def test_a_closure_is_refused_where_the_optimizer_steps_copies_or_scaled_gradients(recipe):
    """The closure would re-evaluate the loss on weights the optimizer is not moving (16-bit
    parameters) or hand it loss-scaled gradients: refused, not the optimizer's TypeError."""
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.LBFGS(model.parameters()))

    def closure():
        optimizer.zero_grad()
        loss = forward(precision, model)
        precision.backward(loss)
        return loss

    with pytest.raises(UsageError, match="closure"):
        precision.step(optimizer, closure)


def test_sparse_gradients_are_unscaled_as_plain_pytorch():
    """``nn.Embedding(sparse=True)`` with SparseAdam under loss scaling: the scale (a power of two)
    comes off exactly, as GradScaler's unscale of the sparse values."""
    tokens = torch.randint(0, 50, (6, 4), generator=torch.Generator().manual_seed(1))

    def run(precision):
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(50, 8, sparse=True)
        optimizer = torch.optim.SparseAdam(embedding.parameters(), lr=0.1)
        if precision is not None:
            embedding = precision.convert(embedding)
            optimizer = precision.wrap_optimizer(optimizer)
        for _ in range(2):
            loss = embedding(tokens).square().mean()
            if precision is None:
                loss.backward()
                optimizer.step()
            else:
                precision.backward(loss)
                assert precision.step(optimizer)
            optimizer.zero_grad()
        return embedding.weight

    assert torch.equal(run(Precision("fp16-mixed")), run(None))


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure-kahan"])
def test_a_param_group_added_after_loading_the_precision_state_resumes_bit_identically(recipe):
    """Progressive unfreezing: the group added mid-run is added again on resume, after
    `load_state_dict`; its master weights (Kahan buffers) reach it at the next step."""

    def build():
        precision = Precision(recipe)
        model = precision.convert(mlp())
        optimizer = torch.optim.AdamW(model[0].parameters(), lr=1e-2)
        return precision, model, precision.wrap_optimizer(optimizer)

    def add_head(model, optimizer):
        optimizer.add_param_group({"params": list(model[2].parameters()), "lr": 1e-3})

    def run(resume: bool):
        precision, model, optimizer = build()
        for seed in range(1, 5):
            if seed == 2:
                add_head(model, optimizer)
            if seed == 4 and resume:
                saved = copy.deepcopy(
                    (model.state_dict(), optimizer.state_dict(), precision.state_dict())
                )
                precision, model, optimizer = build()
                precision.load_state_dict(saved[2])
                add_head(model, optimizer)
                model.load_state_dict(saved[0])
                optimizer.load_state_dict(saved[1])
            precision.backward(forward(precision, model, seed))
            assert precision.step(optimizer)
            optimizer.zero_grad()
        return model

    assert all(map(torch.equal, run(resume=True).parameters(), run(resume=False).parameters()))


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-low", "bf16-pure"])
def test_clipping_model_parameters_after_unscale_is_refused_under_16_bit_parameters(recipe):
    """GradScaler's idiom clips ``model.parameters()`` after ``unscale_``; under 16-bit parameters
    the step reads fp32 copies, and the clip would be silently lost."""
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    precision.backward(forward(precision, model))
    precision.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.0)
    with pytest.raises(UsageError, match=r"clip_grad_norm_\(precision.unscale_"):
        precision.step(optimizer)


def test_zero_grad_without_none_steps_unused_parameters_as_plain_master_weights():
    """``zero_grad(set_to_none=False)`` leaves zero gradients, so momentum keeps moving a layer
    that a step does not use, as in plain PyTorch; the 16-bit ``.grad`` is there after the step.
    The reference is bf16-low written by hand: an fp32 master per parameter, rounded back."""

    def loss_of(model, seed):
        """Every layer in the first step; the later ones leave the first layer unused."""
        x, y = batch(seed)
        hidden = model[1](model[0](x.bfloat16()))
        if seed > 1:
            hidden = hidden.detach()
        return F.cross_entropy(model[2](hidden).float(), y)

    reference = mlp().bfloat16()
    masters = [p.detach().float() for p in reference.parameters()]
    plain = torch.optim.SGD(masters, lr=0.1, momentum=0.9)
    precision = Precision("bf16-low")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for seed in (1, 2, 3):
        loss_of(reference, seed).backward()
        precision.backward(loss_of(model, seed))
        for master, p in zip(masters, reference.parameters()):
            master.grad = p.grad.float()
        plain.step()
        with torch.no_grad():
            for master, p in zip(masters, reference.parameters()):
                p.copy_(master)
        assert precision.step(optimizer)
        assert all(p.grad is not None for p in model.parameters())
        reference.zero_grad(set_to_none=False)
        optimizer.zero_grad(set_to_none=False)
    assert all(map(torch.equal, model.parameters(), reference.parameters()))


def test_a_state_without_loss_scaling_loads_into_a_recipe_with_it():
    """A run that switches from a recipe without loss scaling to one with it: there is no scale
    to restore, and the recipe's initial scale stays (not a KeyError)."""
    before = Precision("bf16-low")
    model = before.convert(mlp())
    before.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    after = Precision("fp16-mixed")
    with pytest.warns(UserWarning, match="saved under recipe bf16-low"):
        after.load_state_dict(before.state_dict())
    assert after.loss_scale == Precision("fp16-mixed").loss_scale


def test_master_weights_of_parameters_that_never_come_do_not_undo_the_steps():
    """A state with master weights for more parameters than are wrapped (a group not added back)
    waits for them, and each step hands on only new parameters' entries: the steps taken since
    the load go on from their masters, as from a state without the extra entries."""
    precision = Precision("bf16-low")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    precision.backward(forward(precision, model))
    precision.step(optimizer)
    saved = precision.state_dict()
    masters = saved["update"]["masters"]
    trimmed = {**saved, "update": {"masters": {0: masters[0], 1: masters[1]}, "compensation": {}}}

    def resume(state):
        precision = Precision("bf16-low")
        model = precision.convert(mlp())
        optimizer = precision.wrap_optimizer(torch.optim.SGD(model[0].parameters(), lr=0.1))
        precision.load_state_dict(state)
        for seed in (2, 3, 4):
            precision.backward(forward(precision, model, seed))
            assert precision.step(optimizer)
            optimizer.zero_grad()
        return precision.state_dict()["update"]["masters"]

    resumed, expected = resume(saved), resume(trimmed)
    assert resumed.keys() == expected.keys() == {0, 1}
    assert all(torch.equal(resumed[index], expected[index]) for index in expected)
