"""Arguments of `cast` and `quantize` a new user gets wrong (session 36): each is refused in one
line naming the fix, where it was ignored without a word or ended in a traceback, and the fix
the line names gives the right result (bit for bit against ml_dtypes where it has the format)."""

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.errors import UsageError
from lowbit.formats import cast, quantize, tensor_amax


def data(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("granularity", ["tensor", "axis"])
def test_a_block_size_for_a_granularity_without_blocks_is_refused(granularity):
    """``quantize(x, "int8", block_size=32)`` quantized per tensor (the default granularity),
    as if block_size had not been given; `OperandSpec` refused it, `quantize` did not."""
    x = data(4, 64)
    x[0, 0] = 100.0  # an outlier: one scale for the row or tensor, another for 1x32 blocks
    with pytest.raises(UsageError, match="granularity='block'") as error:
        quantize(x, "int8", granularity, block_size=32)
    assert "\n" not in str(error.value)
    # the fix it names: 1 x 32 blocks, each with its own scale
    blocks = quantize(x, "int8", "block", block_size=32)
    assert blocks.scale.shape == (4, 2)
    assert blocks.scale[0, 1] < blocks.scale[0, 0]


@pytest.mark.parametrize(
    "given",
    [np.linspace(-3, 3, 13, dtype=np.float32), [0.1, 0.2, 0.3], 0.3],
    ids=["numpy", "list", "float"],
)
def test_something_that_is_no_tensor_is_refused_naming_the_conversion(given):
    for call in (lambda: cast(given, "fp8_e4m3"), lambda: quantize(given, "fp8_e4m3")):
        with pytest.raises(UsageError, match=r"torch\.as_tensor\(x\)") as error:
            call()
        assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match=r"takes a torch\.Tensor"):
        tensor_amax(given)
    # the fix: the values of the format, those ml_dtypes rounds to
    expected = np.asarray(given, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)
    out = cast(torch.as_tensor(given, dtype=torch.float32), "fp8_e4m3")
    assert np.array_equal(out.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_an_axis_that_is_no_whole_number_is_refused():
    """``"last"`` ended in a TypeError, ``1.0`` was taken as an axis; whole numbers of other
    types (numpy's, a 0-d integer tensor) still are axes."""
    x = data(64, 4)
    for axis in ("last", 1.0, None):
        with pytest.raises(UsageError, match="axis=-1") as error:
            quantize(x, "fp8_e4m3", "mx", axis=axis)
        assert "\n" not in str(error.value)
    expected = quantize(x, "fp8_e4m3", "mx", axis=0)
    for axis in (np.int64(0), torch.tensor(0)):
        q = quantize(x, "fp8_e4m3", "mx", axis=axis)
        assert torch.equal(q.values, expected.values) and torch.equal(q.scale, expected.scale)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "bf16", "e8m0"])
def test_a_seed_given_as_generator_is_refused_naming_a_seeded_generator(fmt):
    """``generator=0`` ended in an AttributeError in the counter-based draws (fp8, e8m0) or in
    torch's list of every ``randint`` signature (bf16 and tf32)."""
    x = data(8, 32).abs()
    for call in (
        lambda: cast(x, fmt, "stochastic", generator=0),
        lambda: quantize(x, "fp4_e2m1", "mx", rounding="stochastic", generator=0),
    ):
        with pytest.raises(UsageError, match=r"generator=torch\.Generator\(\)\.manual_seed\(0\)"):
            call()
    # the fix: reproducible draws
    first = cast(x, fmt, "stochastic", generator=torch.Generator().manual_seed(0))
    again = cast(x, fmt, "stochastic", generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)


def test_an_amax_that_is_no_number_is_refused():
    with pytest.raises(UsageError, match="amax must be a number or a tensor"):
        quantize(data(4, 64), "fp8_e4m3", "tensor", amax="max")
    q = quantize(data(4, 64), "fp8_e4m3", "tensor", amax=8)  # a Python number is one
    assert q.scale.item() == torch.tensor(8 / 448).item()


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # deprecated
def test_a_pytorch_quantized_tensor_is_refused_naming_dequantize():
    """A ``qint8`` tensor: `quantize` (which takes integer tensors) ended in PyTorch's error on
    creating a quantized tensor, `cast` named ``x.float()``, which PyTorch refuses for it."""
    x = torch.quantize_per_tensor(data(4, 32), 0.05, 0, torch.qint8)
    for call, args in ((cast, ("fp4_e2m1",)), (quantize, ("int8", "axis"))):
        with pytest.raises(UsageError, match=r"x\.dequantize\(\)") as error:
            call(x, *args)
        assert "\n" not in str(error.value)
    expected = x.dequantize().numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(cast(x.dequantize(), "fp8_e4m3").numpy(), expected)  # the fix works
