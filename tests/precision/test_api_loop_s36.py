"""A user's own loop (session 36): a model cast after `Precision.convert`, and a `Precision` made
for another device than the model's, are refused in one line with the fix, not trained silently
in other numerics than the recipe's."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import UsageError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def _one_step(precision, model, optimizer) -> bool:
    with precision.autocast():
        x = torch.randn(4, 8, dtype=model[2].weight.dtype)  # fp32 but under 16-bit parameters
        loss = model(x).float().pow(2).mean()
    precision.backward(loss)
    return precision.step(optimizer)


@pytest.mark.parametrize(
    ("recipe", "dtype"),
    [
        ("fp8-tensorwise", torch.bfloat16),
        ("fp16-mixed", torch.float16),
        ("bf16-mixed", torch.bfloat16),
    ],
)
def test_a_model_cast_to_16_bits_after_convert_is_refused_at_the_step(recipe, dtype):
    # The recipe trains fp32 weights; cast after convert, the optimizer stepped the 16-bit ones
    # without master weights (fp16-mixed's AdamW wrote inf into them: eps 1e-8 is 0 in fp16).
    precision = lowbit.Precision(recipe)
    model = _model()
    model[0].requires_grad_(False)  # frozen: its 16 bits are no one's update (not refused)
    model = precision.convert(model).to(dtype)
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UsageError, match=r"2\.weight .*precision\.convert\(model\)") as refused:
        _one_step(precision, model, optimizer)
    assert "\n" not in str(refused.value)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # the fix it names: convert again after the cast, which casts the trained weights back
    model = precision.convert(model)
    assert _one_step(precision, model, optimizer)
    assert all(p.dtype == torch.float32 for p in model[2].parameters())
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:CUDA is not available")
@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp8-tensorwise", "fp16-mixed", "bf16-low"])
def test_a_precision_made_for_another_device_is_refused_at_backward(recipe):
    # torch.autocast("cuda") leaves a CPU forward in fp32, as torch.autocast("cpu") (the default
    # device's) leaves a GPU forward: bf16-mixed trained in fp32, fp16-mixed without its fp16
    # emulation (or with it on a GPU), without a word
    precision = lowbit.Precision(recipe, device="cuda")
    model = precision.convert(_model())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        UsageError, match=r"cpu.*cuda.*fix: lowbit\.Precision\(.*device="
    ) as refused:
        _one_step(precision, model, optimizer)
    assert "\n" not in str(refused.value)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # where the recipe computes alike on any device (no autocast, emulation or draws), it trains
    precision = lowbit.Precision("fp32", device="cuda")
    model = precision.convert(_model())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert _one_step(precision, model, optimizer)


def test_backward_given_a_number_is_refused_in_one_line():
    # loss.item() in place of the loss failed with "'float' object has no attribute 'device'"
    precision = lowbit.Precision("fp16-mixed")
    model = precision.convert(_model())
    loss = model(torch.randn(4, 8)).pow(2).mean()
    with pytest.raises(UsageError, match=r"takes the loss tensor, not a float; fix: "):
        precision.backward(loss.item())


@pytest.mark.parametrize("recipe", ["fp16-mixed", "fp16-low"])
def test_a_step_after_loss_backward_under_loss_scaling_is_refused(recipe):
    # loss.backward() in place of precision.backward(loss): the step divided the unscaled
    # gradients by the loss scale, 65536: fp16-mixed's first update was that much too small,
    # and fp16-low's weights never moved
    precision = lowbit.Precision(recipe)
    model = precision.convert(_model())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    with precision.autocast():
        loss = model(torch.randn(4, 8).to(precision.compute_dtype)).float().pow(2).mean()
    loss.backward()
    with pytest.raises(UsageError, match=r"precision\.backward\(loss\) in place of loss\.backward"):
        precision.step(optimizer)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    optimizer.zero_grad()
    assert _one_step(precision, model, optimizer)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # without loss scaling, loss.backward() is precision.backward(loss)
    precision = lowbit.Precision("bf16-mixed")
    model = precision.convert(_model())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with precision.autocast():
        model(torch.randn(4, 8)).float().pow(2).mean().backward()
    assert precision.step(optimizer)
