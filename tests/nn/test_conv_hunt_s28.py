"""Session 28's hunt on the converted Conv2d: torch.func transforms that the unfold could not take,
and convolutions that pad otherwise than with zeros of fixed size (padding="same", reflect)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import convert
from lowbit.errors import UsageError
from tests.nn.test_conv_user_models import CONVS, forward_backward


def converted_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten())
    assert list(convert(model, "fp8-tensorwise").converted) == ["0"]
    return model


TRANSFORMS = {
    "vmap": lambda f, x: torch.func.vmap(f)(x.unsqueeze(1)),
    "jvp": lambda f, x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
    "jacfwd": lambda f, x: torch.func.jacfwd(f)(x),
    "hessian": lambda f, x: torch.func.hessian(lambda x: f(x).sum())(x),
}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_vmap_and_forward_mode_through_a_converted_conv_are_refused_in_one_line(transform):
    # the unfold before the GEMM had no vmap rule and no jvp: PyTorch's own error about
    # "_Unfold", where a converted nn.Linear refuses with what to do instead
    model = converted_cnn()
    with pytest.raises(UsageError, match=r"a layer that a lowbit recipe converted.*fix:"):
        TRANSFORMS[transform](model, torch.randn(2, 3, 5, 5))


# padding="same" and the reflect, replicate and circular modes were kept in high precision ("only
# zero padding of fixed size is converted"): an fp8 recipe left such a CNN unquantized. Checked
# against nn.Conv2d in tests/nn/test_conv_user_models.py; here, the padded image's bits.
PADDINGS = {name: CONVS[name] for name in ("same, even kernel", "reflect", "circular")}


@pytest.mark.parametrize("padding", PADDINGS)
def test_a_padded_conv_quantizes_the_padded_image_bit_for_bit(padding):
    # the same bits as the converted conv without padding on the image nn.Conv2d pads
    torch.manual_seed(0)
    padded = nn.Sequential(nn.Conv2d(4, 8, **PADDINGS[padding]))
    unpadded = nn.Sequential(copy.deepcopy(padded[0]))
    unpadded[0].padding, unpadded[0].padding_mode = (0, 0), "zeros"
    sides = padded[0]._reversed_padding_repeated_twice
    mode = "constant" if padded[0].padding_mode == "zeros" else padded[0].padding_mode
    for model in (padded, unpadded):
        convert(model, "fp8-tensorwise")
    x = torch.randn(2, 4, 9, 10)
    got = forward_backward(padded, x)
    x_padded = F.pad(x, sides, mode=mode)
    want_out, _, want_w = forward_backward(unpadded, x_padded)
    assert torch.equal(got[0], want_out) and torch.equal(got[2], want_w)


def test_a_reflect_padded_image_too_small_is_refused_with_nn_conv2ds_message():
    plain = nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"))
    model = copy.deepcopy(plain)
    convert(model, "fp8-tensorwise")
    x = torch.randn(1, 2, 2, 2)
    with pytest.raises(RuntimeError) as want:
        plain(x)
    with pytest.raises(RuntimeError) as got:
        model(x)
    assert str(got.value) == str(want.value)


def test_forward_mode_dual_tensors_through_a_converted_linear_are_refused_in_one_line():
    """torch.autograd.forward_ad raised PyTorch's "You must implement the jvp function"."""
    import torch.autograd.forward_ad as fwAD

    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    convert(layer, "fp8-tensorwise")
    x = torch.randn(4, 8)
    with fwAD.dual_level(), pytest.raises(UsageError, match="forward-mode derivatives"):
        layer(fwAD.make_dual(x, torch.ones_like(x)))
