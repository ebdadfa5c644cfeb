"""`Precision` and lowbit's optimizers in more loops users write (session 24): a param group added
to one of several optimizers on resume, copies of torchao's quantized optimizer states."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision
from lowbit.errors import UsageError
from lowbit.optim import build_optimizer
from tests.precision.test_precision import mlp


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def moments(optimizer) -> list[torch.Tensor]:
    """Every parameter's first moment, dequantized."""
    states = optimizer.state.values()
    return [getattr(s["exp_avg"], "dequantize", s["exp_avg"].clone)() for s in states]


def forward(precision, model, seed=1):
    x, y = batch(seed)
    with precision.autocast():
        return F.cross_entropy(model(x.to(precision.param_dtype)).float(), y)


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure-kahan"])
def test_a_group_added_to_the_first_of_two_optimizers_after_loading_resumes_bit_identically(
    recipe,
):
    """Progressive unfreezing with two optimizers: the middle layer joins the first optimizer
    mid-run, and on resume after `load_state_dict`. Its master weights (Kahan buffers) reach it,
    and the second optimizer's stay with the second optimizer's parameters (they were shifted by
    the first optimizer's missing group onto the wrong parameters)."""

    def build():
        precision = Precision(recipe)
        model = precision.convert(mlp())
        first = precision.wrap_optimizer(torch.optim.AdamW(model[0].parameters(), lr=1e-2))
        second = precision.wrap_optimizer(
            torch.optim.SGD(model[4].parameters(), lr=0.1, momentum=0.9)
        )
        return precision, model, first, second

    def unfreeze(model, first):
        first.add_param_group({"params": list(model[2].parameters()), "lr": 1e-3})

    def run(resume: bool):
        precision, model, first, second = build()
        for seed in range(1, 6):
            if seed == 2:
                unfreeze(model, first)
            if seed == 4 and resume:
                states = [precision, model, first, second]
                saved = copy.deepcopy([state.state_dict() for state in states])
                precision, model, first, second = build()
                precision.load_state_dict(saved[0])
                unfreeze(model, first)
                model.load_state_dict(saved[1])
                first.load_state_dict(saved[2])
                second.load_state_dict(saved[3])
            precision.backward(forward(precision, model, seed))
            assert precision.step(first, second)
            first.zero_grad()
            second.zero_grad()
        return model

    resumed, uninterrupted = run(resume=True), run(resume=False)
    assert all(map(torch.equal, resumed.parameters(), uninterrupted.parameters()))


@pytest.mark.parametrize("state_precision", ["8bit", "4bit", "fp8"])
def test_a_deep_copy_of_quantized_optimizer_states_is_a_snapshot(state_precision):
    """``copy.deepcopy(optimizer.state_dict())`` (a best-state snapshot kept in memory) of torchao's
    quantized states failed with torchao's NotImplementedError (no ``aten.clone``). The copy is
    its own: later steps leave it alone, and loading it back steps on as from the snapshot."""

    def step(model, optimizer, seed):
        x, _ = batch(seed)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Linear(128, 32))
    optimizer = build_optimizer(model.parameters(), lr=1e-2, state_precision=state_precision)
    step(model, optimizer, 1)
    snapshot = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    copied = copy.deepcopy(optimizer)  # the whole optimizer too
    step(model, optimizer, 2)
    assert not any(map(torch.equal, moments(copied), moments(optimizer)))
    after = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(snapshot[0])
    optimizer.load_state_dict(snapshot[1])
    step(model, optimizer, 2)
    assert all(map(torch.equal, model.parameters(), after))


@pytest.mark.parametrize("recipe", ["fp32", "bf16-low"])
def test_step_takes_a_list_of_optimizers_as_clip_grad_norm_does(recipe):
    """``precision.clip_grad_norm_([a, b], 1.0)`` then ``precision.step([a, b])`` (an
    AttributeError on the list) steps as ``precision.step(a, b)``."""

    def run(as_list: bool):
        precision = Precision(recipe)
        model = precision.convert(mlp())
        first = precision.wrap_optimizer(torch.optim.SGD(model[0].parameters(), lr=0.1))
        rest = precision.wrap_optimizer(torch.optim.SGD(model[2:].parameters(), lr=0.1))
        precision.backward(forward(precision, model))
        precision.clip_grad_norm_([first, rest], 0.5)
        assert precision.step([first, rest]) if as_list else precision.step(first, rest)
        return model

    assert all(map(torch.equal, run(as_list=True).parameters(), run(as_list=False).parameters()))


def test_parameters_instead_of_the_optimizer_are_refused_in_one_line():
    """``precision.clip_grad_norm_(model.parameters(), 1.0)``, torch's arguments, failed with an
    AttributeError deep inside; so did ``unscale_`` and ``step`` given something else."""
    precision = Precision("bf16-low")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    precision.backward(forward(precision, model))
    with pytest.raises(UsageError, match=r"not a generator; fix: precision.clip_grad_norm_\("):
        precision.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(UsageError, match=r"not a generator; fix: precision.unscale_\(optimizer"):
        precision.unscale_(model.parameters())
    with pytest.raises(UsageError, match=r"not a Tensor; fix: precision.step\(optimizer\)"):
        precision.step(optimizer, torch.tensor(1.0))
    assert precision.step(optimizer)


def train(recipe, make_optimizer, steps: int) -> list[torch.Tensor]:
    """The parameters after ``steps`` uninterrupted steps."""
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(make_optimizer(model.parameters()))
    for seed in range(1, steps + 1):
        precision.backward(forward(precision, model, seed))
        assert precision.step(optimizer)
        optimizer.zero_grad()
    return list(model.parameters())


def resume_wrapping_after_the_load(recipe, make_optimizer, wrap_after_load: bool):
    """Four steps, resumed from a state saved after two; the resumed optimizer is wrapped before
    or after its state is loaded. Returns the final parameters."""

    def build():
        precision = Precision(recipe)
        model = precision.convert(mlp())
        return precision, model, make_optimizer(model.parameters())

    precision, model, optimizer = build()
    precision.wrap_optimizer(optimizer)
    for seed in range(1, 5):
        if seed == 3:
            saved = copy.deepcopy([s.state_dict() for s in (precision, model, optimizer)])
            precision, model, optimizer = build()
            if not wrap_after_load:
                precision.wrap_optimizer(optimizer)
            precision.load_state_dict(saved[0])
            model.load_state_dict(saved[1])
            optimizer.load_state_dict(saved[2])
            if wrap_after_load:
                precision.wrap_optimizer(optimizer)
        precision.backward(forward(precision, model, seed))
        assert precision.step(optimizer)
        optimizer.zero_grad()
    return list(model.parameters())


def test_wrapping_an_optimizer_after_loading_its_16_bit_rounded_state_is_refused():
    """torch's ``load_state_dict`` rounds the fp32 moments to a 16-bit parameter's dtype when the
    optimizer is not wrapped yet; wrapping it then upcast them silently, and the resumed run
    differed from the uninterrupted one. Wrapped first, it resumes bit-identically."""

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2)

    with pytest.raises(UsageError, match=r"AdamW's states \(exp_avg, exp_avg_sq\) are 16-bit"):
        resume_wrapping_after_the_load("bf16-low", adamw, wrap_after_load=True)
    resumed = resume_wrapping_after_the_load("bf16-low", adamw, wrap_after_load=False)
    assert all(map(torch.equal, resumed, train("bf16-low", adamw, steps=4)))


def test_bf16_optimizer_states_stay_bf16_when_wrapped_after_loading():
    """lowbit's bf16 states keep their dtypes on load, so wrapping after the load loses nothing;
    wrapping made their bf16 moments fp32 (twice the memory, other numerics)."""

    def bf16_states(params):
        return build_optimizer(params, lr=1e-2, state_precision="bf16")

    resumed = resume_wrapping_after_the_load("bf16-low", bf16_states, wrap_after_load=True)
    assert all(map(torch.equal, resumed, train("bf16-low", bf16_states, steps=4)))
