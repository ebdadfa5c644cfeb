"""Session 43: a model cast to the other 16-bit dtype after `Precision.convert` under a recipe of
16-bit parameters (``model.half()`` under bf16-low)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.errors import UsageError


def _losses(recipe: str, cast: torch.dtype | None, fix: bool = False) -> list[float]:
    """Four steps; before the third, the model is cast to ``cast`` (and, with ``fix``, converted
    again, as the refusal says)."""
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses = []
    for i in range(4):
        if i == 2 and cast is not None:
            model.to(cast)
            if fix:
                model = precision.convert(model)
        generator = torch.Generator().manual_seed(i)
        x = torch.randn(8, 32, generator=generator)
        y = torch.randint(0, 8, (8,), generator=generator)
        loss = F.cross_entropy(model(x.to(model[0].weight.dtype)).float(), y)
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("recipe", "cast"), [("bf16-low", torch.float16), ("bf16-pure", torch.float16)]
)
def test_a_model_cast_to_the_other_16_bit_dtype_after_convert_is_refused_at_the_step(recipe, cast):
    """bf16-low's model cast to fp16 after `convert` trained on in fp16 (fp16's range, and no loss
    scaling) without a word, as a bf16-mixed model cast to 16 bits was refused for."""
    with pytest.raises(
        UsageError, match=r"0\.weight is float16, and recipe .* bfloat16"
    ) as refused:
        _losses(recipe, cast)
    assert "fix: model = precision.convert(model)" in str(refused.value)
    assert "\n" not in str(refused.value)
    # the fix trains on as the model never cast
    assert _losses(recipe, cast, fix=True) == _losses(recipe, None)


def test_fp16_low_refuses_a_model_cast_to_bf16_after_convert():
    with pytest.raises(UsageError, match=r"0\.weight is bfloat16, and recipe fp16-low .* float16"):
        _losses("fp16-low", torch.bfloat16)
