"""What this machine's CPU computes in hardware, as far as lowbit's recipes care: which operand
formats it has kernels for (fp32 and bf16; a layer in any other is emulated, `emulated_layers`), and
whether its bf16 GEMMs run on bf16 instructions.

An x86 CPU without AVX512-BF16 or AMX-BF16 has no instruction that multiplies bf16 values: PyTorch
(oneDNN) widens each bf16 operand to fp32 and runs an fp32 GEMM, so the numbers are the same and
the speed is worse than fp32's (the widening on top: 3-4x fp32's time at the tiny model's shapes
on an AVX-512 Xeon without them, BENCHMARKS.md, "GEMM time per kernel"). A user asking what bf16
saves gets the opposite of the answer on such a machine, so `lowbit train` says so
(`bf16_gemm_warning`).
"""

from __future__ import annotations

import functools
import os
import platform

from lowbit.errors import UsageError

BF16_GEMM_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names of the instructions


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of /proc/cpuinfo's first ``flags`` line; empty where there is no
    such file (not Linux) or line (not x86)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


# ``LOWBIT_BF16_GEMMS=native`` or ``widened`` says what `lacks_bf16_gemms` would tell from the
# flags: for a virtual machine whose /proc/cpuinfo hides instructions the CPU has, and for the
# test suite, whose output must not depend on the machine it runs on
BF16_GEMMS_ENV = "LOWBIT_BF16_GEMMS"


def lacks_bf16_gemms() -> bool:
    """True on an x86 CPU whose flags are known and name no bf16 GEMM instruction
    (`BF16_GEMM_FLAGS`); False where it has one or where that cannot be told (another
    architecture, no /proc/cpuinfo), so that nothing is claimed without evidence; `BF16_GEMMS_ENV`
    decides instead where it is set."""
    given = os.environ.get(BF16_GEMMS_ENV, "").strip().lower()
    if given in ("native", "widened"):
        return given == "widened"
    if given:
        raise UsageError(
            f"{BF16_GEMMS_ENV}={given!r}: not a choice; fix: native, widened, or unset it"
        )
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    flags = cpu_flags()
    return x86 and bool(flags) and not any(flag in flags for flag in BF16_GEMM_FLAGS)


def bf16_gemm_warning(recipe) -> str | None:
    """The warning for a recipe whose GEMMs run in bf16 (bf16 autocast or bf16 parameters: the
    bf16 recipes, and the fp8, MX, NVFP4 and int8 ones, which autocast to bf16) on a CPU that
    `lacks_bf16_gemms`; None elsewhere."""
    if "bf16" not in (recipe.autocast, recipe.param_dtype) or not lacks_bf16_gemms():
        return None
    return (
        f"this CPU has no bf16 GEMM instructions ({' or '.join(BF16_GEMM_FLAGS)}): PyTorch "
        "widens bf16 GEMMs to fp32, the numbers bf16 instructions give at several times fp32's "
        f"time, so recipe {recipe.name} trains slower than fp32 here (docs/recipes.md, 'What "
        "runs natively')"
    )


# Operand formats a CPU computes natively; every other one (fp16, fp8, MX, int8 operands) is
# emulated on exact low-precision values.
NATIVE_FORMATS = ("fp32", "bf16")


def emulated_layers(model) -> list[str]:
    """The names of ``model``'s low-precision layers a CPU runs in emulation: an operand format
    outside `NATIVE_FORMATS`, or auto's formats, which move during training. A mixture of experts'
    GEMMs count as their experts module, as the conversion report counts them: `lowbit train`
    said "converted 10/13 layers" and then "its 24 low-precision layers" of a 2-layer Mixtral."""
    from lowbit.nn.convert import lowbit_layers
    from lowbit.nn.experts import LowbitExperts

    experts = [name for name, module in model.named_modules() if isinstance(module, LowbitExperts)]
    names = {}  # in model order, each once
    for name, layer in lowbit_layers(model).items():
        if layer.lowbit_state.dynamic_spec or any(
            op.format not in NATIVE_FORMATS for op in layer.spec.operands().values()
        ):
            names[next((e for e in experts if name.startswith(f"{e}.")), name)] = None
    return list(names)
