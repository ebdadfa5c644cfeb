"""Converted layers against PyTorch's own (session 26): integer inputs, TorchScript, the memory
format of a convolution's output where the strides are ambiguous."""

import copy

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.nn import convert
from lowbit.recipes import get_recipe, parse_override


def every_layer(preset):
    """A recipe that gives every layer ``preset``'s spec (fp32's too, which converts none)."""
    recipe = get_recipe("fp32")
    return recipe.with_overrides(parse_override(f"*={preset}", recipe))


def converted(layer, preset):
    model = torch.nn.Sequential(copy.deepcopy(layer))
    convert(model, every_layer(preset))
    return model


@pytest.mark.parametrize("preset", ["fp32", "fp8-tensorwise", "int8"])
def test_an_integer_input_is_refused_as_nn_linear_and_nn_conv2d_refuse_it(preset):
    """The layer cast an integer input to floats and its output back to the input's dtype: an
    nn.Linear that refuses a LongTensor returned the output truncated to integers, silently (and
    a quantized Conv2d failed inside F.unfold, "im2col_out_cpu not implemented for 'Long'")."""
    torch.manual_seed(0)
    layers = [
        (torch.nn.Linear(4, 3), torch.randint(0, 5, (2, 4))),
        (torch.nn.Conv2d(2, 3, 3), torch.randint(0, 5, (1, 2, 4, 4))),
    ]
    for layer, x in layers:
        with pytest.raises(RuntimeError):
            layer(x)
        with pytest.raises(RuntimeError, match=r"floating-point inputs.*int64.*fix: .*float32"):
            converted(layer, preset)(x)


@pytest.mark.parametrize("preset", ["fp32", "fp8-tensorwise"])
def test_torch_jit_script_of_a_converted_layer_is_refused_in_one_line(preset):
    """It failed with "Failed to get source for LayerSpec.__init__" (a quantizing spec) or
    "Can't redefine method: __spec_getter" (fp32), naming neither lowbit nor a fix."""
    model = converted(torch.nn.Linear(4, 4), preset)
    with pytest.raises(UsageError, match=r"torch.jit.script cannot compile.*fix: torch.compile"):
        torch.jit.script(model)


def test_torch_jit_trace_refuses_a_quantizing_layer_and_records_an_fp32_one():
    """The tracer failed on the quantizing autograd function with ``unordered_map::at``; an fp32
    layer computes F.linear, which it records as it did."""
    x = torch.randn(3, 4)
    with pytest.raises(UsageError, match=r"torch.jit.trace cannot record.*fix: torch.compile"):
        torch.jit.trace(converted(torch.nn.Linear(4, 4), "fp8-tensorwise"), x)
    model = converted(torch.nn.Linear(4, 4), "fp32")
    traced = torch.jit.trace(model, x)
    other = torch.randn(5, 4)
    assert torch.equal(traced(other), model(other))


def channels_last(tensor):
    return tensor.to(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("conv", "image"),
    [
        (torch.nn.Conv2d(1, 6, 3), lambda: channels_last(torch.randn(2, 1, 5, 5))),  # grayscale
        (channels_last(torch.nn.Conv2d(4, 6, 1)), lambda: torch.randn(2, 4, 5, 5)),  # 1x1 kernel
        (channels_last(torch.nn.Conv2d(1, 6, 1)), lambda: channels_last(torch.randn(2, 1, 5, 5))),
        # an N x W x C x 1 array seen as N x C x 1 x W: channels-last contiguous, read as contiguous
        (torch.nn.Conv2d(4, 6, (1, 3)), lambda: torch.randn(2, 5, 4, 1).permute(0, 2, 3, 1)),
    ],
)
def test_a_channels_last_tensor_of_ambiguous_strides_gives_nn_conv2ds_output_format(conv, image):
    """A one-channel image or a 1x1 kernel is contiguous in both formats; F.conv2d reads its
    channels-last strides as channels-last and gives a channels-last output, where the converted
    layer gave a contiguous one. An image one pixel high whose height has the smallest stride is
    the reverse: channels-last contiguous, which ATen reads as contiguous."""
    torch.manual_seed(0)
    x = image()
    expected = conv(x)
    out = converted(conv, "fp8-tensorwise")(x)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        assert out.is_contiguous(memory_format=memory_format) == expected.is_contiguous(
            memory_format=memory_format
        )
