import ml_dtypes
import numpy as np
import pytest

from lowbit import formats
from lowbit.errors import UsageError
from tests.formats.conftest import REFERENCE_TYPES


@pytest.mark.parametrize("name", [*REFERENCE_TYPES, "fp32"])
def test_limits_match_ml_dtypes_finfo(name):
    fmt = formats.get(name)
    info = ml_dtypes.finfo(REFERENCE_TYPES.get(name, np.float32))
    assert fmt.max == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.epsilon == float(info.eps)
    assert fmt.bits == info.bits


def test_published_maxima():
    # OCP FP8 v1.0 and OCP MX v1.0 tables.
    expected = {"fp8_e4m3": 448, "fp8_e5m2": 57344, "fp6_e3m2": 28, "fp6_e2m3": 7.5, "fp4_e2m1": 6}
    for name, value in expected.items():
        assert formats.get(name).max == value


def test_e8m0_and_int_formats():
    e8m0 = formats.get("e8m0")
    assert (e8m0.bits, e8m0.min_normal, e8m0.max) == (8, 2.0**-127, 2.0**127)
    assert not e8m0.has_inf and e8m0.has_nan
    assert formats.get("int8").qmax == 127
    assert formats.get("int4").qmax == 7


def test_tf32_layout():
    tf32 = formats.get("tf32")
    assert (tf32.ebits, tf32.mbits, tf32.bits) == (8, 10, 19)
    assert tf32.min_normal == formats.get("fp32").min_normal


def test_unknown_format_lists_valid_names():
    with pytest.raises(UsageError, match="valid formats: fp32, tf32, bf16"):
        formats.get("fp7")


def test_formats_are_frozen():
    with pytest.raises(AttributeError):
        formats.get("fp16").mbits = 3
