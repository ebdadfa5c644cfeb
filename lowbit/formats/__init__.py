"""Number formats: the registry (`get`), rounding (`cast`) and scaled quantization (`quantize`)."""

from lowbit.formats.cast import Rounding, cast, cast_reference
from lowbit.formats.qtensor import QTensor, carrier_dtype, quantize, tensor_amax, unit_scale
from lowbit.formats.scaling import Granularity, ScaleRule
from lowbit.formats.spec import Encoding, FloatFormat, Format, IntFormat, get, names

__all__ = [
    "Encoding",
    "FloatFormat",
    "Format",
    "Granularity",
    "IntFormat",
    "QTensor",
    "Rounding",
    "ScaleRule",
    "carrier_dtype",
    "cast",
    "cast_reference",
    "get",
    "names",
    "quantize",
    "tensor_amax",
    "unit_scale",
]
