"""Session 27: a user's own loop (`Precision.convert`, `wrap_optimizer`, `backward`, `step`) on
models and optimizers as users bring them."""

import copy

import pytest
import torch
from torch import nn

import lowbit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _steps(precision: lowbit.Precision, model: nn.Module, optimizer, steps: int):
    """A user's loop of ``steps`` steps on seeded random batches; yields after each step."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=generator).to(precision.compute_dtype)
        with precision.autocast():
            loss = model(x).float().pow(2).mean()
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()
        yield


def _train(precision: lowbit.Precision, model: nn.Module, steps: int = 3) -> nn.Module:
    model = precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    for _ in _steps(precision, model, optimizer, steps):
        pass
    return model


@pytest.mark.parametrize("recipe", ["fp32", "bf16-mixed", "fp16-mixed", "fp8-tensorwise"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_trains_with_the_fp32_weights_its_recipe_promises(recipe, dtype):
    """A model loaded in 16 bits (``from_pretrained(..., torch_dtype=torch.bfloat16)``,
    ``model.half()``) kept its 16-bit parameters under a recipe of fp32 parameters: the optimizer
    stepped them without fp32 weights (and fp16 gradients without loss scaling). Converted, it is
    the same model cast to fp32 by hand."""
    low = _model().to(dtype)
    by_hand = copy.deepcopy(low).float()
    trained = _train(lowbit.Precision(recipe), low)
    reference = _train(lowbit.Precision(recipe), by_hand)
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    for got, want in zip(trained.parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want)


def test_a_frozen_16_bit_base_under_fp32_adapters_keeps_its_dtype():
    """Only parameters the loop trains decide the cast: a frozen bf16 base with fp32 adapters (the
    memory-saving fine-tuning set-up) is not doubled in memory by `convert`."""
    base = nn.Linear(16, 16).to(torch.bfloat16).requires_grad_(False)
    model = nn.ModuleDict({"base": base, "adapter": nn.Linear(16, 16)})
    lowbit.Precision("bf16-mixed").convert(model)
    assert model["base"].weight.dtype == torch.bfloat16
    assert model["adapter"].weight.dtype == torch.float32


class _Momentum(torch.optim.Optimizer):
    """SGD with momentum as a user writes it; ``eager`` makes the buffers in the constructor (as
    some optimizers do) instead of at the first step, and no step is counted."""

    def __init__(self, params, lr=0.1, eager=False):
        super().__init__(params, {"lr": lr})
        if eager:
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["buf"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state.setdefault("buf", torch.zeros_like(p)).mul_(0.9).add_(p.grad)
                    p.add_(state["buf"], alpha=-group["lr"])


@pytest.mark.parametrize("recipe", ["bf16-low", "fp16-low", "bf16-pure-kahan"])
def test_an_optimizer_that_makes_its_states_in_its_constructor_is_wrapped(recipe):
    """An optimizer whose constructor made its (16-bit, zero) buffers was refused by
    `wrap_optimizer` as "loaded or stepped before it was wrapped" although it was wrapped at once;
    it steps as the one that makes them at its first step, and once stepped unwrapped it is still
    refused (its buffers hold 16-bit roundings)."""

    def train(eager: bool) -> nn.Module:
        precision = lowbit.Precision(recipe)
        model = precision.convert(_model())
        optimizer = precision.wrap_optimizer(_Momentum(model.parameters(), eager=eager))
        for _ in _steps(precision, model, optimizer, 3):
            pass
        assert {s["buf"].dtype for s in optimizer.state.values()} == {torch.float32}
        return model

    for got, want in zip(
        train(eager=True).parameters(), train(eager=False).parameters(), strict=True
    ):
        assert torch.equal(got, want)

    precision = lowbit.Precision(recipe)
    model = precision.convert(_model())
    stepped = _Momentum(model.parameters(), eager=True)
    model(torch.randn(8, 16).to(precision.compute_dtype)).float().sum().backward()
    stepped.step()
    with pytest.raises(lowbit.errors.UsageError, match="16-bit already"):
        precision.wrap_optimizer(stepped)


@pytest.mark.parametrize(
    "recipe", ["fp32", "bf16-low", "fp16-low", "bf16-pure-sr", "bf16-pure-kahan"]
)
def test_a_step_post_hook_sees_the_stepped_weights_and_their_states(recipe):
    """An optimizer step post-hook (where an EMA of the model is often updated) ran inside the
    optimizer's step under 16-bit parameters: it saw the model's weights before the step's
    write-back (the EMA lagged a step behind) and ``optimizer.state[param]`` failed with KeyError.
    It runs once the step is written back, as after a plain optimizer's step."""
    precision = lowbit.Precision(recipe)
    model = precision.convert(_model())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    seen = []

    def after_step(opt, args, kwargs):
        assert opt is optimizer and args == (optimizer,)
        seen.append(
            ([p.detach().clone() for p in model.parameters()], len(opt.state[model[0].weight]))
        )

    optimizer.register_step_post_hook(after_step)
    for _ in _steps(precision, model, optimizer, 2):
        weights, states = seen[-1]
        assert states == 3  # step, exp_avg, exp_avg_sq of the model's own parameter
        for got, want in zip(weights, model.parameters(), strict=True):
            assert torch.equal(got, want)
    assert len(seen) == 2
