"""`lowbit.convert` on users' own CNNs: what a converted Conv2d returns, as nn.Conv2d would."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import convert, get_recipe
from lowbit.formats.error import sqnr
from lowbit.nn import LowbitConv2d
from lowbit.recipes import parse_override

CONVS = {
    "strided": dict(kernel_size=3, stride=2, padding=1),
    "dilated": dict(kernel_size=3, dilation=2, padding=2),
    "non-square": dict(kernel_size=(1, 5), stride=(2, 1), padding=(0, 2)),
    "1x1 without bias": dict(kernel_size=1, bias=False),
    "valid": dict(kernel_size=(3, 2), stride=(1, 3), dilation=(2, 1), padding="valid"),
    # padded otherwise than with zeros of fixed size: kept in high precision before session 28
    "same": dict(kernel_size=3, padding="same"),
    "same, even kernel": dict(kernel_size=(4, 2), padding="same"),
    "same, dilated": dict(kernel_size=3, dilation=(2, 1), padding="same"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate": dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="replicate", stride=2),
    "circular": dict(kernel_size=3, padding=(2, 1), padding_mode="circular", bias=False),
}
INPUTS = {
    "batch": lambda x: x,
    "channels-last": lambda x: x.to(memory_format=torch.channels_last),
    "batch of one": lambda x: x[:1],
    "unbatched": lambda x: x[0],
}


class TutorialNet(nn.Module):
    """The CNN of PyTorch's "Training a classifier" tutorial, which flattens with ``view``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(-1, 16 * 5 * 5))))


def forward_backward(model, x, grad_seed=1):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)))
    return out.detach(), x.grad, model[0].weight.grad


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("conv", CONVS)
def test_a_converted_conv2d_computes_what_nn_conv2d_does(conv, inputs):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 8, **CONVS[conv]))
    x = INPUTS[inputs](torch.randn(2, 4, 11, 13))
    expected = forward_backward(plain, x)
    fp32 = get_recipe("fp8-tensorwise")
    fp32 = fp32.with_overrides(parse_override("0=fp32", fp32))  # converted, every operand fp32
    for recipe, floor in ((fp32, None), ("fp8-tensorwise", 20), ("mxfp8", 20)):
        model = copy.deepcopy(plain)
        assert list(convert(model, recipe).converted) == ["0"]
        mode = plain[0].padding_mode
        assert (model[0].padding, model[0].padding_mode) == (plain[0].padding, mode)
        assert (f"padding_mode={mode}" in repr(model)) == (mode != "zeros")
        got = forward_backward(model, x)
        for want, have in zip(expected, got):
            assert have.shape == want.shape and have.stride() == want.stride()
            if floor is None:
                assert torch.equal(have, want)
            else:
                assert sqnr(want, have) > floor
        with torch.no_grad():
            assert torch.equal(model(x), got[0])


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "mxfp8", "int8"])
def test_a_cnn_that_flattens_with_view_runs_converted(recipe):
    torch.manual_seed(0)
    model = TutorialNet()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    assert len(convert(model, recipe).converted) == 3  # fc2, the final classifier, is kept
    assert sqnr(expected, model(x)) > 20


@pytest.mark.parametrize("layout", ["input", "weight"])
def test_the_output_is_channels_last_where_nn_conv2d_makes_it_so(layout):
    plain = nn.Sequential(nn.Conv2d(4, 8, 3))
    x = torch.randn(2, 4, 9, 9)
    if layout == "input":
        x = x.to(memory_format=torch.channels_last)
    else:
        plain.to(memory_format=torch.channels_last)
    model = copy.deepcopy(plain)
    convert(model, "fp8-tensorwise")
    out = model(x)
    assert plain(x).is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 5, 9, 9), r"expected input\[1, 5, 9, 9\] to have 4 channels, but got 5"),
        ((5, 9, 9), r"expected input\[1, 5, 9, 9\] to have 4 channels, but got 5"),
        ((4, 9), r"Expected 3D \(unbatched\) or 4D \(batched\) input to conv2d"),
    ],
)
def test_an_input_nn_conv2d_refuses_is_refused_with_its_message(shape, message):
    plain = nn.Sequential(nn.Conv2d(4, 8, 3))
    model = copy.deepcopy(plain)
    convert(model, "fp8-tensorwise")
    x = torch.randn(shape)
    if len(shape) == 4:
        with pytest.raises(RuntimeError, match=message):
            plain(x)
    with pytest.raises(RuntimeError, match=message):
        model(x)


def test_the_repr_shows_dilation_and_bias():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, dilation=2, bias=False))
    convert(model, "fp8-tensorwise")
    assert isinstance(model[0], LowbitConv2d)
    assert "dilation=(2, 2), bias=False" in repr(model[0])
