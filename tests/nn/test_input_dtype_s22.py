"""Float inputs under 16-bit-parameter recipes without autocast (``*-low``, ``bf16-pure*``): the
user casts them to ``precision.compute_dtype``, as after ``model.half()`` in plain PyTorch."""

import copy

import pytest
import torch

import lowbit


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure", "bf16-pure-sr", "bf16-pure-kahan"])
def test_inputs_cast_to_the_compute_dtype_compute_as_plain_pytorch(recipe):
    """These recipes convert no layer: an fp32 input fails where plain PyTorch's bf16 model
    fails, with its message, and cast to ``compute_dtype`` gives plain PyTorch's bits."""
    plain = copy.deepcopy(_cnn()).to(torch.bfloat16)
    precision = lowbit.Precision(recipe)
    model = precision.convert(_cnn())
    images = torch.randn(2, 1, 8, 8)
    with pytest.raises(RuntimeError) as plain_error:
        plain(images)
    with pytest.raises(RuntimeError) as lowbit_error, precision.autocast():
        model(images)
    assert str(lowbit_error.value) == str(plain_error.value)

    assert precision.compute_dtype == torch.bfloat16
    with precision.autocast():
        out = model(images.to(precision.compute_dtype))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, plain(images.to(torch.bfloat16)))


def test_fp16_low_takes_inputs_in_its_compute_dtype():
    precision = lowbit.Precision("fp16-low")
    model = precision.convert(_cnn())
    with precision.autocast():
        out = model(torch.randn(2, 1, 8, 8).to(precision.compute_dtype))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
