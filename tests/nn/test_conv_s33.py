"""Session 33: convolutions lowbit keeps, named by a user's override."""

import pytest
from torch import nn

from lowbit import convert, get_recipe
from lowbit.recipes import parse_override

KEPT_KIND = (
    "is not converted (lowbit converts nn.Linear, nn.Conv2d, nn.ConvTranspose2d, transformers' "
    "Conv1D)"
)


@pytest.mark.parametrize(
    ("layer", "kind"),
    [
        (nn.Conv1d(4, 4, 3), "Conv1d"),
        (nn.ConvTranspose1d(4, 4, 3), "ConvTranspose1d"),
        (nn.Conv3d(4, 4, 1), "Conv3d"),
    ],
)
def test_an_override_naming_a_convolution_lowbit_keeps_says_why_it_is_kept(layer, kind):
    """``--override 'up=mxfp8'`` on a ConvTranspose2d was answered "up (ConvTranspose2d) is no
    GEMM layer: up.* names its layers", and up.* names nothing (ConvTranspose2d is converted
    since session 40; the other transposed convolutions are kept)."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3), layer)
    base = get_recipe("fp8-tensorwise")
    report = convert(model, base.with_overrides(parse_override("1=mxfp8", base)))
    assert report.unused_overrides == ["1=mxfp8"]
    summary = report.summary()
    assert f"override 1=mxfp8 applies to no layer (1: {kind} {KEPT_KIND})" in summary
    assert "names its layers" not in summary


def test_an_override_shadowed_by_an_earlier_one_says_which():
    """``0=keep`` then ``0=mxfp8``: the second decides nothing, and the hint called layer 0 "no
    GEMM layer" and offered ``0.*``, which names nothing."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    base = get_recipe("fp8-tensorwise")
    recipe = base.with_overrides(parse_override("0=keep", base), parse_override("0=mxfp8", base))
    summary = convert(model, recipe).summary()
    assert (
        "override 0=mxfp8 applies to no layer (0 takes override 0=keep first: the first override "
        "to name an operand decides it)"
    ) in summary
