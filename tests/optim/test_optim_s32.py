import copy

import pytest
import torch

import lowbit
from lowbit.errors import UsageError
from lowbit.optim import build_optimizer


def _stepped_torch_state(**options):
    """A ``torch.optim.AdamW`` state of a small parameter (fp32 moments, as every state precision
    keeps for tensors under 4096 values), saved with ``options``."""
    param = torch.nn.Parameter(torch.zeros(16))
    optimizer = torch.optim.AdamW([param], lr=0.1, **options)
    param.grad = torch.ones(16)
    optimizer.step()
    return optimizer.state_dict()


@pytest.mark.parametrize("state", ["bf16", "fp8", "8bit", "4bit"])
@pytest.mark.parametrize("option", ["maximize", "amsgrad"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_a_saved_option_the_states_would_ignore_is_refused_on_load(state, option, wrapped):
    saved = _stepped_torch_state(**{option: True})
    model = torch.nn.Linear(16, 1, bias=False)
    precision = lowbit.Precision("bf16-low")
    if wrapped:
        model = precision.convert(model)
    optimizer = build_optimizer([model.weight], lr=0.1, state_precision=state)
    if wrapped:
        optimizer = precision.wrap_optimizer(optimizer)
    with pytest.raises(UsageError, match=rf"saved optimizer state has {option}=True.*fix: "):
        optimizer.load_state_dict(saved)
    assert not optimizer.param_groups[0].get(option)
    # the refused load left the optimizer as it was: it still trains the model's own weight
    before = model.weight.detach().float().clone()
    model.weight.grad = torch.ones_like(model.weight)
    (precision.step if wrapped else lambda o: o.step())(optimizer)
    assert (model.weight.detach().float() < before).all()


@pytest.mark.parametrize("state", ["bf16", "fp8"])
def test_the_same_state_without_the_option_still_loads(state):
    saved = _stepped_torch_state()
    param = torch.nn.Parameter(torch.zeros(16))
    optimizer = build_optimizer([param], lr=0.1, state_precision=state)
    optimizer.load_state_dict(saved)
    assert torch.equal(optimizer.state[param]["exp_avg"], saved["state"][0]["exp_avg"])


def test_fp32_states_still_load_a_maximizing_state_and_maximize():
    saved = _stepped_torch_state(maximize=True)
    param = torch.nn.Parameter(torch.zeros(16))
    optimizer = build_optimizer([param], lr=0.1)
    optimizer.load_state_dict(saved)
    param.grad = torch.ones(16)
    optimizer.step()
    assert (param > 0).all()


@pytest.mark.parametrize("name", ["adamw", "adam"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fp32_states_of_an_fp32_run_continue_on_parameters_of_another_dtype(name, dtype):
    """As ``torch.optim.AdamW`` continues: its moments placed in the parameter's dtype."""
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    param = torch.nn.Parameter(weight.clone())
    optimizer = build_optimizer([param], name=name, lr=1e-2)
    param.grad = torch.randn_like(param)
    optimizer.step()
    saved = optimizer.state_dict()

    ours = torch.nn.Parameter(param.detach().to(dtype))
    theirs = torch.nn.Parameter(param.detach().to(dtype))
    optimizer = build_optimizer([ours], name=name, lr=1e-2)
    reference = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)([theirs], lr=1e-2)
    optimizer.load_state_dict(saved)
    reference.load_state_dict(saved)
    grad = torch.randn_like(weight).to(dtype)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    optimizer.step()
    reference.step()
    assert torch.equal(ours, theirs)
    assert optimizer.state[ours]["exp_avg"].dtype == dtype


def _run_step(precision, model, optimizer, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 64, generator=gen).to(precision.param_dtype)
    with precision.autocast():
        loss = model(x).float().square().mean()
    precision.backward(loss)
    precision.step(optimizer)
    optimizer.zero_grad()


@pytest.mark.parametrize("state", ["fp32", "bf16", "fp8", "8bit", "4bit"])
@pytest.mark.parametrize("recipe", ["fp32", "bf16-low"])
def test_a_deep_copy_of_a_run_with_lowbit_optimizer_states_continues_bit_identically(recipe, state):
    """``copy.deepcopy((model, optimizer, precision))`` of a run whose optimizer keeps bf16, fp8,
    8-bit or 4-bit states: the copy's first step failed with an AttributeError (``is_adamw``)."""
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(
        torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
    )
    optimizer = precision.wrap_optimizer(
        build_optimizer(model.parameters(), lr=1e-2, state_precision=state, seed=7)
    )
    _run_step(precision, model, optimizer, 0)
    copied_model, copied_optimizer, copied_precision = copy.deepcopy((model, optimizer, precision))
    for seed in (1, 2):
        _run_step(precision, model, optimizer, seed)
        _run_step(copied_precision, copied_model, copied_optimizer, seed)
    assert all(map(torch.equal, model.parameters(), copied_model.parameters()))
    # the copy still refuses what its load cannot take
    with pytest.raises(UsageError, match=r"optimizer\.load_state_dict"):
        copied_optimizer.load_state_dict(model.state_dict())


@pytest.mark.parametrize("state", ["bf16", "fp8", "8bit", "4bit"])
def test_a_whole_optimizer_saved_with_torch_save_loads_and_steps(state, tmp_path):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = build_optimizer([param], lr=1e-2, state_precision=state, seed=7)
    param.grad = torch.randn_like(param)
    optimizer.step()
    torch.save(optimizer, tmp_path / "optimizer.pt")
    loaded = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    for each in (optimizer, loaded):
        each.param_groups[0]["params"][0].grad = param.grad.clone()
        each.step()
    assert torch.equal(loaded.param_groups[0]["params"][0], param)
