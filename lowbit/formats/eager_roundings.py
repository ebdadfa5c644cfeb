"""Inductor keeps the 16-bit roundings of compiled lowbit code, so it gives eager's bits.

PyTorch computes a bf16 or fp16 op in fp32 and rounds its result to 16 bits. Where inductor
(`torch.compile`'s default backend) fuses that op into the one that reads its result, it skips
the rounding (the fp32 -> 16-bit -> fp32 round trip) unless
``torch._inductor.config.emulate_precision_casts`` is True. lowbit's formats and emulated recipes
are made of such roundings: `cast` of an fp32 tensor to bf16 or fp16 is that round trip (a
compiled ``cast(x, "bf16") * 2`` returned ``2 * x`` unrounded), and so are fp16-low's fp16 values
at the GEMM boundaries and a bf16 output under autocast read by the next layer's quantization;
without them the scales and quantized values come from the unrounded values (figures in
docs/recipes.md). So the public formats functions (`cast`, `cast_reference`, `quantize`,
`QTensor.dequantize`) and every converted layer, traced, set the setting where it is False and
say so in one log line; ``TORCHINDUCTOR_EMULATE_PRECISION_CASTS=0`` (torch's own variable for the
setting) keeps inductor's default. The setting applies to the whole process: code compiled
afterwards keeps eager's roundings too.
"""

from __future__ import annotations

import logging
import os

import torch

from lowbit.dynamo_marks import assume_constant_result

_log = logging.getLogger(__name__)
_ENV = "TORCHINDUCTOR_EMULATE_PRECISION_CASTS"


def keep_eager_roundings() -> None:
    """In a traced graph (`torch.compile`), have inductor keep the 16-bit roundings (see the
    module's docstring); nothing in eager mode. Called by the public formats functions and by
    every converted layer's forward."""
    if torch.compiler.is_compiling():
        _set_emulate_precision_casts()


@assume_constant_result  # run while Dynamo traces, not traced: it writes a global
def _set_emulate_precision_casts() -> bool:
    """Set ``torch._inductor.config.emulate_precision_casts`` where it is False, saying so, unless
    the environment says ``TORCHINDUCTOR_EMULATE_PRECISION_CASTS=0``. Set, it stays set: the line
    comes once, unless the user sets it back to False and compiles again."""
    from torch._inductor import config

    if config.emulate_precision_casts or os.environ.get(_ENV) == "0":
        return True
    config.emulate_precision_casts = True
    _log.warning(
        "lowbit: set torch._inductor.config.emulate_precision_casts = True, so that compiled code "
        "keeps the bf16/fp16 roundings of lowbit's formats and emulated recipes (eager's bits; "
        "inductor fuses them away otherwise); %s=0 keeps inductor's default",
        _ENV,
    )
    return True
