"""Low-precision layers (`LowbitLinear`, `LowbitConv2d`, `LowbitConvTranspose2d`, `LowbitConv1D`)
and `convert`."""

from lowbit.nn.conv import LowbitConv2d, LowbitConvTranspose2d
from lowbit.nn.convert import ConversionReport, convert, lowbit_layers
from lowbit.nn.gemm import emulated_gemm, exact_accumulation
from lowbit.nn.linear import LayerState, LowbitConv1D, LowbitLinear, lowbit_linear
from lowbit.nn.scaled_mm import emulated_gemms

__all__ = [
    "ConversionReport",
    "LayerState",
    "LowbitConv1D",
    "LowbitConv2d",
    "LowbitConvTranspose2d",
    "LowbitLinear",
    "convert",
    "emulated_gemm",
    "emulated_gemms",
    "exact_accumulation",
    "lowbit_layers",
    "lowbit_linear",
]
