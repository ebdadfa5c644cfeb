"""Session 35: a bf16 recipe on a CPU without bf16 GEMM instructions is said to train slower than
fp32 there (PyTorch widens its GEMMs to fp32), told from /proc/cpuinfo's flags or
``LOWBIT_BF16_GEMMS``."""

import pytest

from lowbit import cpu
from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.recipes import get_recipe

NAMES = (
    "fp32",
    "fp16-mixed",
    "fp16-low",
    "bf16-mixed",
    "bf16-low",
    "fp8-tensorwise",
    "mxfp4",
    "int8",
)
NANO = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


@pytest.fixture
def flags(monkeypatch):
    """Set the CPU's flags and architecture as /proc/cpuinfo and platform would give them."""
    monkeypatch.delenv(cpu.BF16_GEMMS_ENV)

    def set_flags(names: str, machine: str = "x86_64"):
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(names.split()))
        monkeypatch.setattr(cpu.platform, "machine", lambda: machine)

    return set_flags


@pytest.mark.parametrize(
    "names, machine, lacks",
    [
        ("fpu avx2 avx512f avx512bw avx512_vnni", "x86_64", True),  # AVX-512 Xeon, no BF16
        ("fpu avx2 avx512f avx512_bf16", "x86_64", False),  # AMD EPYC (Zen 4)
        ("fpu avx2 avx512f amx_bf16 amx_tile", "x86_64", False),  # Xeon with AMX
        ("", "x86_64", False),  # flags unknown: nothing claimed
        ("fp asimd", "aarch64", False),  # another architecture: nothing claimed
    ],
)
def test_the_cpu_flags_tell_widened_bf16_gemms(flags, names, machine, lacks):
    flags(names, machine)
    assert cpu.lacks_bf16_gemms() is lacks
    assert (cpu.bf16_gemm_warning(get_recipe("bf16-mixed")) is not None) is lacks


def test_only_recipes_computing_in_bf16_are_warned_of(flags):
    flags("fpu avx2 avx512f")
    warned = {name: cpu.bf16_gemm_warning(get_recipe(name)) is not None for name in NAMES}
    assert warned == {
        "fp32": False,
        "fp16-mixed": False,
        "fp16-low": False,
        "bf16-mixed": True,
        "bf16-low": True,
        "fp8-tensorwise": True,
        "mxfp4": True,
        "int8": True,
    }


def test_the_environment_decides_over_the_flags(flags, monkeypatch):
    flags("fpu avx2 avx512f amx_bf16")
    monkeypatch.setenv(cpu.BF16_GEMMS_ENV, "widened")
    assert cpu.lacks_bf16_gemms()
    flags("fpu avx2 avx512f")
    monkeypatch.setenv(cpu.BF16_GEMMS_ENV, " Native ")
    assert not cpu.lacks_bf16_gemms()
    monkeypatch.setenv(cpu.BF16_GEMMS_ENV, "fast")
    with pytest.raises(UsageError, match="LOWBIT_BF16_GEMMS='fast': not a choice; fix: native"):
        cpu.lacks_bf16_gemms()


def test_lowbit_train_warns_once_of_a_bf16_recipe_on_such_a_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(cpu.BF16_GEMMS_ENV, "widened")
    argv = ["train", *NANO, "--steps", "1", "--recipe", "bf16-mixed", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    line = (
        "lowbit: warning: this CPU has no bf16 GEMM instructions (avx512_bf16 or amx_bf16): "
        "PyTorch widens bf16 GEMMs to fp32, the numbers bf16 instructions give at several times "
        "fp32's time, so recipe bf16-mixed trains slower than fp32 here (docs/recipes.md, 'What "
        "runs natively')"
    )
    assert err.splitlines().count(line) == 1
