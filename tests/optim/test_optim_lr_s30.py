import copy
import json

import pytest
import torch

import lowbit
from lowbit.optim import build_optimizer

TORCHAO_STATES = ["fp8", "8bit", "4bit"]


def _step(optimizer, weight, seed):
    weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    optimizer.step()


@pytest.mark.parametrize("state", TORCHAO_STATES)
def test_torchao_states_keep_the_lr_a_float_that_logging_can_write(state):
    """torchao stores the lr as a 0-dim tensor (and lowbit's step wrote one back):
    ``scheduler.get_last_lr()`` returned ``[tensor(0.0025)]``, which ``json.dumps`` refused."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = build_optimizer([weight], lr=0.01, state_precision=state)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    for seed in range(2):
        _step(optimizer, weight, seed)
        scheduler.step()
    assert json.dumps(scheduler.get_last_lr()) == "[0.0025]"
    assert type(optimizer.param_groups[0]["lr"]) is float
    # a checkpoint saved while the lr was torchao's tensor loads with a float lr
    saved = optimizer.state_dict()
    saved["param_groups"][0]["lr"] = torch.tensor(0.0025)
    again = build_optimizer([torch.nn.Parameter(weight.detach().clone())], state_precision=state)
    again.load_state_dict(saved)
    assert type(again.param_groups[0]["lr"]) is float
    assert again.param_groups[0]["lr"] == pytest.approx(0.0025)


@pytest.mark.parametrize("state", TORCHAO_STATES)
def test_a_float_lr_steps_as_torchaos_tensor_lr_and_a_tensor_lr_stays_a_tensor(state):
    torch.manual_seed(0)
    start = torch.randn(64, 64)
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    as_float = build_optimizer([weights[0]], lr=0.01, state_precision=state)
    as_tensor = build_optimizer([weights[1]], lr=torch.tensor(0.01), state_precision=state)
    for seed in range(3):
        for optimizer, weight in zip((as_float, as_tensor), weights, strict=True):
            _step(optimizer, weight, seed)
    assert torch.equal(weights[0], weights[1])
    assert isinstance(as_tensor.param_groups[0]["lr"], torch.Tensor)  # torchao's fill_ idiom


def _wrapped(make_optimizer):
    torch.manual_seed(0)
    precision = lowbit.Precision("bf16-low")
    model = precision.convert(torch.nn.Sequential(torch.nn.Linear(64, 64)))
    return precision, model, precision.wrap_optimizer(make_optimizer(model.parameters()))


def _train_step(precision, model, optimizer):
    with precision.autocast():
        loss = model(torch.randn(4, 64).to(precision.compute_dtype)).float().square().mean()
    precision.backward(loss)
    precision.step(optimizer)
    optimizer.zero_grad()


def _holds_model_params(model, optimizer) -> bool:
    return all(
        any(p is q for q in model.parameters()) for g in optimizer.param_groups for p in g["params"]
    )


OPTIMIZERS = {
    "torch-adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "lowbit-8bit": lambda ps: build_optimizer(ps, lr=1e-2, state_precision="8bit"),
}


class _Refused(Exception):
    pass


def _refuse(*args):
    raise _Refused("a user's hook refused the load")


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("where", ["pre-hook after wrap", "post-hook before wrap"])
def test_a_load_failing_after_the_swap_leaves_the_model_training(name, where):
    """The precision's load pre-hook swaps fp32 stand-ins into the param groups and its post-hook
    swaps them out; a load that failed in between (a user's hook raising, a state torch cannot
    cast) ran no post-hook, and the optimizer went on stepping the stand-ins."""
    precision, model, optimizer = _wrapped(OPTIMIZERS[name])
    _train_step(precision, model, optimizer)
    saved = optimizer.state_dict()
    make = OPTIMIZERS[name]
    if where == "post-hook before wrap":

        def make(ps):
            optimizer = OPTIMIZERS[name](ps)
            optimizer.register_load_state_dict_post_hook(_refuse)
            return optimizer

    precision2, model2, optimizer2 = _wrapped(make)
    if where == "pre-hook after wrap":
        optimizer2.register_load_state_dict_pre_hook(_refuse)
    with pytest.raises(_Refused):
        optimizer2.load_state_dict(saved)
    assert _holds_model_params(model2, optimizer2)
    before = model2[0].weight.detach().clone()
    _train_step(precision2, model2, optimizer2)
    assert not torch.equal(before, model2[0].weight)


def _bf16_run(seed, steps, weight):
    optimizer = build_optimizer([weight], lr=1e-3, state_precision="bf16", seed=seed)
    for i in range(steps):
        _step(optimizer, weight, i)
    return optimizer


def test_bf16_states_resume_with_their_saved_seed_and_name_another_in_a_warning(capsys):
    """The stochastic rounding's seed was not saved: resumed with another ``seed=``, a run drew
    other rounding bits than the uninterrupted one."""
    torch.manual_seed(0)
    start = torch.randn(64, 64)
    reference = torch.nn.Parameter(start.clone())
    uninterrupted = _bf16_run(1, 4, reference)
    first = torch.nn.Parameter(start.clone())
    saved = copy.deepcopy(_bf16_run(1, 2, first).state_dict())
    assert saved["seed"] == 1
    for seed, warned in ((1, False), (2, True)):
        resumed = torch.nn.Parameter(first.detach().clone())
        optimizer = _bf16_run(seed, 0, resumed)
        optimizer.load_state_dict(saved)
        for i in range(2, 4):
            _step(optimizer, resumed, i)
        assert torch.equal(resumed, reference)
        assert torch.equal(
            optimizer.state[resumed]["exp_avg"], uninterrupted.state[reference]["exp_avg"]
        )
        err = capsys.readouterr().err
        assert ("saved with seed 1" in err and "not with seed 2" in err) is warned
        assert len(err.splitlines()) == int(warned)


def test_bf16_states_saved_without_a_seed_load_with_their_own():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    saved = _bf16_run(1, 1, weight).state_dict()
    del saved["seed"]  # a checkpoint from before the seed was saved
    optimizer = _bf16_run(3, 0, torch.nn.Parameter(weight.detach().clone()))
    optimizer.load_state_dict(saved)
    assert optimizer.seed == 3
