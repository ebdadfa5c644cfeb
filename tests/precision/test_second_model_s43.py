"""Session 43: a second model trained by a `Precision` that converted only the first."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))


def _train(precision, first, second, steps: int = 3) -> list[float]:
    """Two models, one optimizer each, stepped together as a GAN's (README "As a library")."""
    optimizers = [
        precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        for model in (first, second)
    ]
    losses = []
    for i in range(steps):
        generator = torch.Generator().manual_seed(i)
        x = torch.randn(16, 32, generator=generator)
        y = torch.randint(0, 8, (16,), generator=generator)
        with precision.autocast():
            loss = F.cross_entropy(first(x), y) + F.cross_entropy(second(x), y)
        precision.backward(loss)
        precision.step(*optimizers)
        for optimizer in optimizers:
            optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_a_second_model_converted_by_lowbit_convert_alone_is_warned_of_at_its_first_step():
    """Session 42 warned of a `Precision` that converted no model; one that converted the first
    trained a second, converted by ``lowbit.convert`` alone, without a word: `step` moved only the
    first model's fp8-delayed amax histories (the second's stayed empty, every step scaling with
    its current amax), and `state_dict` left its layers out."""
    precision = lowbit.Precision("fp8-delayed")
    first = precision.convert(_mlp(0))
    second = _mlp(1)
    lowbit.convert(second, "fp8-delayed")
    with pytest.warns(UserWarning, match=r"precision\.convert\(\) was not given") as caught:
        _train(precision, first, second)
    (warning,) = [w for w in caught if "was not given" in str(w.message)]  # once
    assert "fix: model = precision.convert(model)" in str(warning.message)
    assert warning.filename == __file__  # the user's line

    # the fix: the second model's histories move, as under precision.convert alone
    precision = lowbit.Precision("fp8-delayed")
    first = precision.convert(_mlp(0))
    second = _mlp(1)
    lowbit.convert(second, "fp8-delayed")
    second = precision.convert(second)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = _train(precision, first, second)
    direct = lowbit.Precision("fp8-delayed")
    assert fixed == _train(direct, direct.convert(_mlp(0)), direct.convert(_mlp(1)))
    assert sorted(precision.state_dict()["layers"]) == ["0", "1:0", "1:2", "2"]
