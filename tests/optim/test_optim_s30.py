import copy

import pytest
import torch

import lowbit
from lowbit.errors import UsageError
from lowbit.optim import build_optimizer


def _setup(recipe, make_optimizer, split):
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)))
    params = list(model.parameters())
    groups = [{"params": params[:split]}, {"params": params[split:]}] if split else params
    return precision, model, precision.wrap_optimizer(make_optimizer(groups))


def _train_step(precision, model, optimizer):
    x = torch.randn(4, 64).to(precision.compute_dtype)
    with precision.autocast():
        loss = model(x).float().square().mean()
    precision.backward(loss)
    precision.step(optimizer)
    optimizer.zero_grad()


OPTIMIZERS = {
    "torch-sgd": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9),
    "torch-adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2),
    "lowbit-fp32": lambda groups: build_optimizer(groups, lr=1e-2),
    "lowbit-8bit": lambda groups: build_optimizer(groups, lr=1e-2, state_precision="8bit"),
}


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-low"])
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("wrong", ["other groups", "a model's state"])
def test_a_refused_optimizer_load_leaves_the_model_training(recipe, name, wrong):
    """A load refused for its param groups (or for not being an optimizer's state) used to leave
    the fp32 stand-ins of the 16-bit weights in the optimizer's param groups: a loop that went on
    stepped the stand-ins and the model never moved again."""
    precision, model, optimizer = _setup(recipe, OPTIMIZERS[name], split=0)
    _train_step(precision, model, optimizer)
    saved = optimizer.state_dict() if wrong == "other groups" else model.state_dict()
    precision2, model2, optimizer2 = _setup(recipe, OPTIMIZERS[name], split=2)
    with pytest.raises(UsageError) as refused:
        optimizer2.load_state_dict(saved)
    assert "\n" not in str(refused.value) and "fix:" in str(refused.value)
    assert all(
        any(p is q for q in model2.parameters())
        for g in optimizer2.param_groups
        for p in g["params"]
    )
    before = model2[0].weight.detach().clone()
    _train_step(precision2, model2, optimizer2)
    assert not torch.equal(before, model2[0].weight)


def _plain_bf16_run():
    """The weights and fp32 optimizer states of a run without `lowbit.Precision` on a bf16
    model: torch's AdamW makes the moments in the parameter's dtype, bf16."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 16).bfloat16()  # 1024 weights: fp32 states in every precision
    optimizer = build_optimizer(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64).bfloat16()).float().square().mean().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    assert saved["state"][0]["exp_avg"].dtype == torch.bfloat16
    return model.state_dict(), saved


def _resume_under(recipe, weights, saved, make_optimizer):
    precision = lowbit.Precision(recipe)
    model = precision.convert(torch.nn.Linear(64, 16))
    model.load_state_dict(weights)
    optimizer = precision.wrap_optimizer(make_optimizer(model.parameters()))
    optimizer.load_state_dict(copy.deepcopy(saved))
    torch.manual_seed(1)
    for _ in range(2):
        with precision.autocast():
            loss = model(torch.randn(4, 64).bfloat16()).float().square().mean()
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure-kahan"])
def test_bf16_moments_of_a_run_without_precision_resume_under_it_as_torch_does(recipe):
    """The load accepts fp32 states in the parameter's own dtype; under a 16-bit-parameter recipe
    lowbit's AdamW kept them bf16 and the step on the fp32 stand-ins failed with a dtype
    RuntimeError. They now step as torch.optim.AdamW's (cast to fp32), bit for bit."""
    weights, saved = _plain_bf16_run()
    expected, _ = _resume_under(
        recipe, weights, saved, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0)
    )
    model, optimizer = _resume_under(
        recipe, weights, saved, lambda ps: build_optimizer(ps, lr=1e-2)
    )
    assert torch.equal(model.weight, expected.weight)
    assert optimizer.state[model.weight]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("state", ["bf16", "8bit"])
def test_bf16_moments_of_small_tensors_load_into_other_state_precisions(state):
    """Tensors under 4096 values keep fp32 states in every precision, so fp32 states saved by a
    plain bf16 run load into bf16 or 8-bit states; their bf16 moments are cast to fp32 too."""
    weights, saved = _plain_bf16_run()
    model, optimizer = _resume_under(
        "bf16-low", weights, saved, lambda ps: build_optimizer(ps, lr=1e-2, state_precision=state)
    )
    assert optimizer.state[model.weight]["exp_avg"].dtype == torch.float32
    assert torch.isfinite(model.weight).all()
