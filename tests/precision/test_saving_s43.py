"""Session 43: ``torch.save`` of whole objects in a user's loop (a checkpoint of the model, the
optimizer and the `Precision` as they are)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.errors import UsageError


def _trained(recipe: str):
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)))
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    x, y = torch.randn(16, 32), torch.randint(0, 8, (16,))
    with precision.autocast():
        loss = F.cross_entropy(model(x.to(precision.compute_dtype)).float(), y)
    precision.backward(loss)
    precision.step(optimizer)
    return precision, model, optimizer


@pytest.mark.parametrize("recipe", ["fp16-mixed", "bf16-low", "fp8-delayed"])
def test_torch_save_of_a_precision_says_to_save_its_state_dict(recipe):
    """``torch.save({"model": model, "optimizer": optimizer, "precision": precision})`` failed
    deep inside pickle with "cannot pickle 'weakref.ReferenceType' object", naming neither the
    object nor what to save instead."""
    precision, model, optimizer = _trained(recipe)
    checkpoint = {"model": model, "optimizer": optimizer, "precision": precision}
    with pytest.raises(UsageError, match=r"precision\.state_dict\(\)") as refused:
        torch.save(checkpoint, io.BytesIO())
    assert "\n" not in str(refused.value)
    assert "fix: " in str(refused.value)

    # what the message says to save loads into a new run
    buffer = io.BytesIO()
    torch.save({"model": model, "precision": precision.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    lowbit.Precision(recipe).load_state_dict(loaded["precision"])


def test_a_deep_copy_of_a_run_still_continues_as_the_run():
    """`copy.deepcopy((model, optimizer, precision))` is documented to continue bit for bit: the
    refusal of pickling leaves it working."""
    precision, model, optimizer = _trained("bf16-low")
    optimizer.zero_grad()  # (a Parameter's deep copy has no .grad, in plain PyTorch too)
    twin_precision, twin_model, twin_optimizer = copy.deepcopy((precision, model, optimizer))
    x, y = torch.randn(16, 32), torch.randint(0, 8, (16,))
    for run in ((precision, model, optimizer), (twin_precision, twin_model, twin_optimizer)):
        p, m, o = run
        loss = F.cross_entropy(m(x.to(p.compute_dtype)).float(), y)
        p.backward(loss)
        p.step(o)
    for original, twin in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(original, twin)
