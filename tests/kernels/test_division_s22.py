"""The kernel's non-power-of-two scales (amax scaling: int8 and fp8 rows and tensors, delayed
scaling, NVFP4's two-level scales) against the PyTorch path, bit for bit, on the inputs where a
faster division or a cheaper clamp and rounding would show: quotients x / d on and one ulp around
every rounding boundary of the target grid, divisors with all-ones significands and just above a
power of two, fp32 subnormals, quotients that overflow, inf, NaN and -0.0, and millions of random
pairs under stochastic rounding, whose draws compare against every bit of the quotient.
"""

import math

import pytest
import torch

from lowbit.nn.gemm import _fold
from tests.formats.test_fast_paths import assert_same_bits
from tests.kernels.test_quantize_kernel import assert_same_qtensor, both_paths

F32 = torch.float32
INF = float("inf")


def neighbours(x: torch.Tensor, ulps: int = 2) -> torch.Tensor:
    """x and the fp32 numbers up to `ulps` steps either side of it (stacked along a new last axis)."""
    out, up, down = [x], x, x
    for _ in range(ulps):
        up, down = (
            torch.nextafter(up, torch.full_like(up, INF)),
            torch.nextafter(down, torch.full_like(down, -INF)),
        )
        out += [up, down]
    return torch.stack(out, -1)


def divisors() -> torch.Tensor:
    """Positive fp32 divisors: all-ones significands, one ulp above a power of two, a few bits,
    random, over many binades (every one the quotient of some amax by a format's maximum)."""
    gen = torch.Generator().manual_seed(0)
    exponents = torch.arange(-40, 40, 7, dtype=torch.int32)
    significands = [0x7FFFFF, 0x7FFFFE, 0x400000 - 1, 1, 2, 0x400001, 0x555555, 0x2AAAAB]
    significands += torch.randint(0, 1 << 23, (8,), generator=gen).tolist()
    patterns = (exponents[:, None] + 127) << 23 | torch.tensor(significands, dtype=torch.int32)
    return patterns.reshape(-1).view(F32)


def amax_giving(divisor: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """An fp32 amax whose scale fp32(amax / fmt_max) is `divisor` where one exists (the nearest
    of a few candidates otherwise: the test reads the scale the kernel used back)."""
    guess = (divisor.double() * fmt_max).float()
    candidates = neighbours(guess, 3)
    hit = (candidates / fmt_max) == divisor[:, None]
    return candidates.gather(1, hit.int().argmax(1, keepdim=True)).squeeze(1)


def quotient_targets(boundaries: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows of x whose quotients x / scale[row] land on and around every boundary: fp32(b * d)
    and its neighbours, both signs."""
    x = (boundaries.double()[None, :] * scale.double()[:, None]).float()
    x = neighbours(x).reshape(len(scale), -1)
    return torch.cat([x, -x], 1)


def e4m3_e5m2_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of an fp8 format and every midpoint between neighbours."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    values = values[torch.isfinite(values) & (values >= 0)].unique()
    return torch.cat([values, (values[1:] + values[:-1]) / 2])


INT8_BOUNDARIES = torch.arange(-127.5, 128, 0.5)  # every half-integer and integer in range
E2M1_GRID = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6])
E2M1_BOUNDARIES = torch.cat([E2M1_GRID, (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2, torch.tensor([7.0])])

SPECIALS = torch.tensor([0.0, -0.0, INF, -INF, float("nan"), 1e-45, -1e-45, 1e-39, -3e-39, 1e-30])
SPECIALS = torch.cat([SPECIALS, torch.tensor([3.4e38, -3.4e38, 1e30, -1e25, 2.0**-126, 2.0**-149])])


@pytest.mark.parametrize(
    ("name", "fmt_max", "boundaries"),
    [
        ("int8", 127.0, INT8_BOUNDARIES),
        ("fp8_e4m3", 448.0, e4m3_e5m2_grid(torch.float8_e4m3fn)),
        ("fp8_e5m2", 57344.0, e4m3_e5m2_grid(torch.float8_e5m2)),
    ],
    ids=["int8", "e4m3", "e5m2"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["rows", "transposed"])
def test_quotients_on_and_around_every_rounding_boundary_round_as_the_division(
    name, fmt_max, boundaries, dtype, layout
):
    """Row-wise scaling with a given amax per row (the divisors above): every row holds the
    quotients at, and one and two ulps around, each boundary of its grid (and specials)."""
    d = divisors()
    amax = amax_giving(d, fmt_max)
    scale = both_paths(torch.zeros(len(d), 4), name, "axis", amax=amax)[1].scale.reshape(-1)
    assert (scale == d).float().mean() > 0.9  # the scales are (almost all) the divisors asked for
    x = quotient_targets(boundaries, scale)
    x = torch.cat([x, SPECIALS.expand(len(d), -1)], 1).to(dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()
    fused, plain = both_paths(x, name, "axis", amax=amax)
    assert_same_qtensor(fused, plain)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("amax", [1e-30, 3e-3, 1.0 + 2.0**-23, 2.0**24 - 1.0, 1e36])
def test_one_tensor_scale_gives_the_division_for_specials_and_overflowing_quotients(name, amax):
    """Tensor-wise delayed scaling: an amax far below the values makes quotients overflow fp32
    (saturate, not NaN), one far above makes small ones underflow to +-0; plus inf, NaN, -0.0."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 96, generator=gen) * torch.exp2(
        torch.randint(-30, 30, (64, 96), generator=gen)
    )
    x.view(-1)[: len(SPECIALS)] = SPECIALS
    fused, plain = both_paths(x, name, "tensor", amax=torch.tensor(amax))
    assert_same_qtensor(fused, plain)
    values = fused.values.float().view(-1)
    assert values[2] > 0 and values[3] == -values[2]  # +-inf saturate to +-max
    if amax < 1e-20:  # so does a finite quotient that overflows fp32
        assert values[10] == values[2] and values[11] == values[3]
    if name != "int8":  # -0.0 stays -0.0
        assert math.copysign(1.0, values[1].item()) == -1.0


def test_nvfp4_quotients_on_and_around_every_e2m1_boundary_round_as_the_division():
    """NVFP4: the divisor of a 16-element block is its e4m3 scale times the fp32 tensor scale.
    Each block's first element fixes its amax; the other 15 are quotients at and around the e2m1
    grid's points and midpoints for that block's divisor, read back from a first call."""
    gen = torch.Generator().manual_seed(2)
    blocks = 4096
    block_amax = torch.exp2(torch.rand(blocks, generator=gen) * 24 - 12) * (
        1 + torch.rand(blocks, generator=gen)
    )
    x = torch.zeros(blocks, 16)
    x[:, 0] = block_amax
    first = both_paths(x, "fp4_e2m1", "nvfp4")[1]
    divisor = (first.scale.reshape(-1) * first.tensor_scale).float()
    targets = neighbours(E2M1_BOUNDARIES, 2).reshape(-1)  # 80 quotients
    pick = torch.randint(0, len(targets), (blocks, 15), generator=gen)
    sign = torch.where(torch.rand(blocks, 15, generator=gen) < 0.5, -1.0, 1.0)
    quotients = targets[pick] * sign
    x[:, 1:] = (quotients.double() * divisor.double()[:, None]).float()
    x[:, 1:] = torch.minimum(x[:, 1:].abs(), block_amax[:, None]) * x[:, 1:].sign()  # amax stays
    x[5, 3], x[6, 4], x[7, 5] = -0.0, 1e-40, -1e-45
    fused, plain = both_paths(x, "fp4_e2m1", "nvfp4")
    assert_same_qtensor(fused, plain)
    fused, plain = both_paths(x, "fp4_e2m1", "nvfp4", fold=True, rounding="stochastic", seed=6)
    assert_same_qtensor(fused, plain)
    assert_same_bits(_fold(fused)[0], _fold(plain)[0])  # the GEMM operand the kernel wrote


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_millions_of_random_quotients_match_the_division(rounding):
    """4M random (x, d) pairs: one random divisor per row (significand and binade random), x
    spread over +-4 times the row's amax (delayed scaling saturates beyond it); stochastic
    rounding compares each quotient's fraction with a 24-bit draw, so a quotient one ulp off
    changes the result in about one case in 2**24 / (its ulps per unit)."""
    gen = torch.Generator().manual_seed(3)
    rows, cols = 2048, 2048
    amax = torch.exp2(torch.randint(-60, 60, (rows,), generator=gen).float()) * (
        1 + torch.rand(rows, generator=gen)
    )
    x = (torch.rand(rows, cols, generator=gen) * 8 - 4) * amax[:, None]
    fused, plain = both_paths(x, "int8", "axis", amax=amax, rounding=rounding, seed=4)
    assert_same_qtensor(fused, plain)
    fused, plain = both_paths(
        x[:256], "fp8_e4m3", "axis", amax=amax[:256], rounding=rounding, seed=5
    )
    assert_same_qtensor(fused, plain)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("amax", [None, "given"])
def test_row_scales_of_a_sliced_view_in_groups_of_rows(name, dtype, rounding, amax):
    """Row-wise scales go through the rows in groups (amaxes and scales first, then the rounding):
    a view whose rows are further apart than their length, a row count that is no multiple of the
    group, one column, and rows of zeros, inf and NaN give the PyTorch path's bits."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(37, 300, generator=gen) * torch.exp2(
        torch.randint(-8, 8, (37, 1), generator=gen)
    )
    base[3] = 0.0
    base[4, 7], base[5, 9], base[6, 2] = INF, float("nan"), -0.0
    for x in (base[:, 5:205].to(dtype), base[:, 11:12].to(dtype)):
        row_amax = (x.float().abs().amax(1) * 0.75).nan_to_num(1.0) if amax else None
        fused, plain = both_paths(x, name, "axis", amax=row_amax, rounding=rounding, seed=8)
        assert_same_qtensor(fused, plain)
