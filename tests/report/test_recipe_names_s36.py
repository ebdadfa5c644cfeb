"""Session 36: a recipe name that is the start of several presets' (``bf16``, ``fp8``, ``mx``)
is answered with those presets, not the list of every name; a near miss that changes a number
(a bit width) is not offered as the name meant."""

import pytest

from lowbit.cli import main

SEVERAL = {
    "bf16": "'bf16-mixed', 'bf16-low', 'bf16-pure', 'bf16-pure-sr' or 'bf16-pure-kahan'",
    "FP16": "'fp16-mixed' or 'fp16-low'",
    "mx": "'mxfp8', 'mxfp6', 'mxfp8-rceil', 'mxfp6-rceil' or 'mxfp4'",
    "fp4": "'mxfp4', 'nvfp4' or 'auto:fp4'",
}
ONE = {"fp8-row": "fp8-rowwise", "bf16-sr": "bf16-pure-sr", "kahan": "bf16-pure-kahan"}


def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize("name", list(SEVERAL))
def test_the_start_of_several_names_lists_them(name, capsys):
    fix = f"fix: did you mean {SEVERAL[name]}?"
    assert _error(capsys, "recipes", name).endswith(fix)
    assert _error(capsys, "compare", "--recipes", f"fp32,{name}").endswith(fix)


@pytest.mark.parametrize("name", list(ONE))
def test_a_shortened_name_is_named(name, capsys):
    assert _error(capsys, "recipes", name).endswith(f"fix: did you mean {ONE[name]!r}?")


@pytest.mark.parametrize("name", ["mxfp4-rceil", "nvfp8", "fp32-mixed"])
def test_a_near_miss_of_another_bit_width_is_not_offered(name, capsys):
    """'mxfp4-rceil' was answered "did you mean 'mxfp8-rceil'?", another precision."""
    line = _error(capsys, "compare", "--recipes", f"fp32,{name}")
    assert "did you mean" not in line and "fix: use names from: fp32, bf16-mixed" in line
