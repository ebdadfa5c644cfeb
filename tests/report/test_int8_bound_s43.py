"""Session 43: benchmarks/int8_bound.py, whose bound BENCHMARKS.md quotes (int8 with its forward
GEMMs, then also their epilogue, made free, against bf16-mixed): the overrides hold only inside
their block, and bad settings are refused before any model is built."""

import importlib.util

import pytest
import torch

from lowbit import kernels
from tests.report.conftest import BENCHMARKS


@pytest.fixture
def int8_bound(monkeypatch):
    """benchmarks/int8_bound.py as a module (a script, importing its neighbours)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("int8_bound_s43", BENCHMARKS / "int8_bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_free_kernels_replace_the_real_ones_only_inside_their_block(int8_bound):
    """A row timed with the real kernel still overridden would bound nothing; one left overridden
    after would make the next round's plain int8 step free too."""
    draw = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=draw)
    b = torch.randint(-128, 128, (64, 32), dtype=torch.int8, generator=draw)
    exact = a.to(torch.int64) @ b.to(torch.int64)  # |sums| < 2**21: int32 holds them
    free = int8_bound.FreeKernels()
    with free.active(epilogue=False):
        inside = torch._int_mm(a, b)
    assert inside.dtype == torch.int32 and not inside.any()
    assert torch.equal(torch._int_mm(a, b).to(torch.int64), exact)
    assert free.calls["_int_mm"] == 1


@pytest.mark.skipif(not kernels.available(), reason="lowbit's C++ kernels are not built here")
def test_the_free_epilogue_is_a_zero_output_of_the_dtype_asked(int8_bound):
    acc = torch.full((4, 8), 3, dtype=torch.int32)
    row, col = torch.full((4, 1), 2.0), torch.full((8, 1), 0.5)
    free = int8_bound.FreeKernels()
    with free.active(epilogue=True):
        inside = kernels.scale_rows_cols(acc, row, col, torch.bfloat16)
    assert inside.dtype == torch.bfloat16 and inside.shape == (4, 8) and not inside.any()
    assert torch.equal(kernels.scale_rows_cols(acc, row, col), torch.full((4, 8), 3.0))
    assert free.calls["scale_rows_cols"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
    ],
)
def test_a_bad_setting_is_refused_in_one_line(argv, message, tmp_path, as_script):
    done = as_script("int8_bound", *argv, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == f"int8_bound.py: error: {message}"
