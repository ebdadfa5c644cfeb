"""Edge cases of the fused CPU kernels against the PyTorch path and ml_dtypes, bit for bit.

A property-style sweep with fixed seeds: layouts (transposed, strided, zero-stride), empty and
one-element tensors, ragged tail blocks, long rows, special values (NaN, +-inf, -0.0, fp32 and
bf16 subnormals, all-zero blocks, rounding ties, the format's max), fp32/bf16/fp16 inputs,
stochastic rounding with a fixed seed, and one thread against two.
"""

import contextlib

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit import kernels
from lowbit.formats import quantize
from tests.formats.test_fast_paths import assert_same_bits
from tests.kernels.test_quantize_kernel import assert_same_qtensor
from tests.recipes.test_fine_grained import ML_DTYPES

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the fused kernels did not build")

SCHEMES = [
    ("fp8_e4m3", "tensor", None, None),
    ("fp8_e4m3", "tensor", None, "pow2"),
    ("fp8_e5m2", "axis", None, None),
    ("fp8_e4m3", "block", 128, None),
    ("fp8_e4m3", "block2d", (16, 32), None),
    ("fp8_e4m3", "mx", None, None),
    ("fp8_e5m2", "mx", None, "mx_ceil"),
    ("fp6_e3m2", "mx", None, None),
    ("fp6_e2m3", "mx", None, None),
    ("fp4_e2m1", "mx", None, None),
    ("fp4_e2m1", "nvfp4", None, None),
    ("fp4_e2m1", "nvfp4", (16, 16), None),
    ("int8", "axis", None, None),
    ("int8", "tensor", None, None),
    ("int4", "block", 32, None),
]


def edge_tensor(shape, seed=0):
    """Random values over many binades with every special value sprinkled in (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp2(
        torch.randint(-30, 30, shape, generator=gen).float()
    )
    flat = x.view(-1)
    n = flat.numel()
    specials = [
        float("nan"),
        float("inf"),
        -float("inf"),
        -0.0,
        1e-45,  # fp32's smallest subnormal
        -3e-39,  # an fp32 subnormal
        2.0**-133,  # bf16's smallest subnormal
        448.0,
        -448.0,
        6.0,
        57344.0,
        3.4e38,
    ]
    if n:
        picks = torch.randint(0, n, (len(specials),), generator=gen)
        for at, value in zip(picks.tolist(), specials, strict=True):
            flat[at] = value
    if n >= 64:
        flat[:32] = 0.0  # an all-zero block
        flat[32:48] = -0.0
        flat[48:64] *= 1e-40  # fp32 subnormals
    return x


def layouts(x):
    """The same matrix values in several memory layouts."""
    rows, cols = x.shape
    yield "contiguous", x
    yield "transposed", x.t().contiguous().t()
    padded = torch.zeros(rows * 2, cols * 3, dtype=x.dtype)
    padded[::2, ::3] = x
    yield "strided", padded[::2, ::3]
    yield "offset", padded[1:, 2:][1::2, 2::3][: rows - 1] if rows > 1 else x
    if rows:
        yield "expanded", x[:1].expand(rows, cols)
    if cols:
        yield "column-expanded", x[:, :1].expand(rows, cols)


def both_paths(x, *args, seed=None, **kwargs):
    def run():
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return quantize(x, *args, generator=generator, **kwargs)

    fused = run()
    with kernels.disabled():
        plain = run()
    return fused, plain


def assert_paths_agree(cases, *args, extra=None, **kwargs):
    """Quantize each case's tensor (``(label, tensor, seed)``) in every layout and with both
    roundings, with the kernels and without: the same bits (``extra(fused, plain)`` checks
    more), a failure naming the case, layout and rounding."""
    for label, base, seed in cases:
        for layout, x in layouts(base):
            for rounding in ("nearest", "stochastic"):
                try:
                    fused, plain = both_paths(x, *args, rounding=rounding, seed=seed, **kwargs)
                    assert_same_qtensor(fused, plain)
                    if extra is not None:
                        extra(fused, plain)
                except AssertionError as error:
                    raise AssertionError(f"{label} {layout} {rounding}: {error}") from error


SHAPES = [(0, 64), (5, 0), (1, 1), (3, 33), (2, 129), (17, 48), (32, 47)]


@pytest.mark.parametrize(("name", "granularity", "block", "rule"), SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_edge_shapes_layouts_and_values_match_the_pytorch_path(
    name, granularity, block, rule, dtype
):
    cases = [(shape, edge_tensor(shape, i).to(dtype), i + 1) for i, shape in enumerate(SHAPES)]
    assert_paths_agree(cases, name, granularity, block_size=block, scale_rule=rule)


@pytest.mark.parametrize(("name", "granularity", "block", "rule"), SCHEMES, ids=str)
def test_a_long_row_matches_the_pytorch_path(name, granularity, block, rule):
    wide = edge_tensor((2, 70001), 5)
    tall = edge_tensor((40, 70001), 6).t()  # a transposed operand of many rows
    for x in (wide, tall):
        for rounding in ("nearest", "stochastic"):
            fused, plain = both_paths(
                x, name, granularity, block_size=block, scale_rule=rule, rounding=rounding, seed=3
            )
            assert_same_qtensor(fused, plain)


@pytest.mark.parametrize(("name", "granularity", "block", "rule"), SCHEMES, ids=str)
def test_one_thread_and_two_give_the_same_bits(name, granularity, block, rule):
    x = edge_tensor((300, 200), 9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(
                [
                    quantize(
                        layout_x,
                        name,
                        granularity,
                        block_size=block,
                        scale_rule=rule,
                        rounding="stochastic",
                        generator=torch.Generator().manual_seed(4),
                    )
                    for _, layout_x in layouts(x)
                ]
            )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert_same_qtensor(a, b)


def grid_and_ties(name):
    """Every value of the format, the midpoints between neighbours (ties), and values beside them."""
    dtype = ML_DTYPES[name]
    bits = {"fp6_e3m2": 6, "fp6_e2m3": 6, "fp4_e2m1": 4}.get(name, 8)
    grid = np.unique(np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    mids = (grid[:-1].astype(np.float64) + grid[1:]) / 2
    near = np.concatenate(
        [
            np.nextafter(mids.astype(np.float32), np.float32(np.inf)),
            np.nextafter(mids.astype(np.float32), np.float32(-np.inf)),
        ]
    )
    return np.concatenate([grid, mids.astype(np.float32), near]).astype(np.float32)


def on_path(fused: bool):
    """The kernel (the default) or the PyTorch path it falls back to."""
    return contextlib.nullcontext() if fused else kernels.disabled()


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_rounding_of_ties_and_grid_matches_ml_dtypes(name, fused):
    """Unit-scale quantization (a tensor amax equal to the format's max) rounds every grid value,
    tie and near-tie as ml_dtypes does (ties to even), on both paths."""
    values = grid_and_ties(name)
    fmt_max = float(np.max(values[np.isfinite(values)]))
    inside = values[np.abs(values) <= fmt_max]
    x = torch.from_numpy(inside.copy()).reshape(1, -1)
    with on_path(fused):
        q = quantize(x, name, "tensor", amax=torch.tensor(fmt_max))
    expected = inside.astype(ML_DTYPES[name]).astype(np.float32)
    scale = q.scale.reshape(()).item()
    assert scale == 1.0, scale
    got = q.values.float().reshape(-1).numpy()
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), name


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_kernel_mx_scales_are_e8m0_values(name):
    """MX block scales are e8m0 values (powers of two, 2**-127 .. 2**127; NaN for an inf block)."""
    x = edge_tensor((8, 256), 2)
    q = quantize(x, name, "mx")
    scale = q.scale.reshape(-1).numpy()
    as_e8m0 = scale.astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    assert np.array_equal(np.isnan(scale), np.isnan(as_e8m0))
    finite = ~np.isnan(scale)
    assert np.array_equal(scale[finite], as_e8m0[finite])


EPILOGUE_SHAPES = [(0, 5), (4, 0), (1, 1), (7, 33), (3, 70)]


def accumulators(shape, seed):
    """int32, fp32 and bf16 accumulators of ``shape`` in a contiguous, a row-strided and a
    zero-row-stride (expanded) layout, all with unit column stride (what the kernel takes)."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    ints = torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32)
    if ints.numel():
        ints.view(-1)[0] = 2**31 - 1  # not an fp32 number: rounds on conversion
        ints.view(-1)[-1] = -(2**31)
    for acc in (ints, edge_tensor(shape, seed), edge_tensor(shape, seed).bfloat16()):
        yield acc
        wide = torch.zeros(rows, cols + 3, dtype=acc.dtype)
        wide[:, :cols] = acc
        yield wide[:, :cols]
        if rows:
            yield acc[:1].expand(rows, cols)


def scales(n, seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, 1, generator=gen) * torch.exp2(torch.randint(-140, 60, (n, 1), generator=gen))
    s = s.float()
    if n >= 3:
        s[0], s[1], s[2] = float("inf"), 0.0, float("nan")
    return s


@pytest.mark.parametrize("shape", EPILOGUE_SHAPES, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_epilogue_matches_the_pytorch_path(shape, out_dtype):
    from lowbit.nn.gemm import add_scaled_rows_cols_, scale_rows_cols

    rows, cols = shape
    for seed, acc in enumerate(accumulators(shape, 7)):
        for row, col in [
            (scales(rows, seed), scales(cols, seed + 1)),
            (scales(1, seed), scales(cols, seed + 1)),
            (scales(rows, seed), scales(1, seed + 1)),
        ]:
            fused = scale_rows_cols(acc, row, col, out_dtype)
            with kernels.disabled():
                plain = scale_rows_cols(acc, row, col, out_dtype)
            assert fused.dtype == plain.dtype == out_dtype
            assert_same_bits(fused, plain)
            base = edge_tensor(shape, seed + 2)
            fused = add_scaled_rows_cols_(base.clone(), acc, row, col)
            with kernels.disabled():
                plain = add_scaled_rows_cols_(base.clone(), acc, row, col)
            assert_same_bits(fused, plain)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 0, 4), (0, 2, 2), (1, 1, 1), (4, 9, 70)], ids=str)
def test_blockwise_epilogue_matches_the_pytorch_path(dtype, shape):
    from lowbit.nn.gemm import add_scaled_blocks_

    blocks, rows, cols = shape
    gen = torch.Generator().manual_seed(1)
    if dtype == torch.int32:
        partials = torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=dtype)
    else:
        partials = edge_tensor(shape, 3).to(dtype)
    row = torch.stack([scales(rows, k).reshape(rows) for k in range(blocks)] or [torch.empty(rows)])
    col = torch.stack(
        [scales(cols, k + 9).reshape(cols) for k in range(blocks)] or [torch.empty(cols)]
    )
    row, col = row[:blocks], col[:blocks]
    base = edge_tensor((rows, cols), 4)
    fused = add_scaled_blocks_(base.clone(), partials, row, col)
    with kernels.disabled():
        plain = add_scaled_blocks_(base.clone(), partials, row, col)
    assert_same_bits(fused, plain)


STATS_CASES = [
    ("fp8_e4m3", "tensor", None),
    ("fp8_e5m2", "axis", None),
    ("fp8_e4m3", "block", 128),
    ("fp4_e2m1", "mx", None),
    ("fp4_e2m1", "nvfp4", None),
    ("int8", "axis", None),
    ("fp16", "tensor", None),
    ("bf16", "tensor", None),
]


def assert_same_stats(fused, plain):
    """Counts, amax and median scale equal (NaN equal to NaN); sums up to float64 summation order."""
    exact = [0, 2, 3, 5, 6]
    torch.testing.assert_close(fused[exact], plain[exact], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize(("fmt", "granularity", "block"), STATS_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gradient", [False, True])
def test_operand_stats_match_the_pytorch_path_on_edge_tensors(
    fmt, granularity, block, dtype, gradient
):
    from lowbit.diagnostics.stats import operand_stats_tensor

    for seed, shape in enumerate([(0, 16), (1, 1), (3, 33), (17, 48), (2, 70001)]):
        if granularity == "tensor" and 0 in shape:
            continue  # an empty tensor has no tensor scale: stats.py's reshape(()) refuses it
        base = edge_tensor(shape, seed).to(dtype)
        for layout, x in layouts(base):
            q = quantize(x, fmt, granularity, block_size=block)
            fused = operand_stats_tensor(x, q, gradient)
            with kernels.disabled():
                plain = operand_stats_tensor(x, q, gradient)
            try:
                assert_same_stats(fused, plain)
            except AssertionError as error:
                raise AssertionError(f"{shape} {layout}: {error}") from error


AMAX_SPECIALS = [0.0, -1.0, float("nan"), float("inf"), 1e-45, 3.0, 1e30]


@pytest.mark.parametrize(
    ("name", "granularity"),
    [
        ("fp8_e4m3", "tensor"),
        ("int8", "tensor"),
        ("fp8_e5m2", "axis"),
        ("int8", "axis"),
        ("fp4_e2m1", "nvfp4"),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_given_amaxes_with_special_values_match_the_pytorch_path(name, granularity, dtype):
    x = edge_tensor((7, 40), 6).to(dtype)
    for layout, view in layouts(x):
        rows = view.shape[0]
        if granularity == "axis":
            amaxes = [torch.tensor(AMAX_SPECIALS * 2)[:rows]] if rows else []
        else:
            amaxes = [torch.tensor(a) for a in AMAX_SPECIALS]
        for amax in amaxes:
            for rounding in ("nearest", "stochastic"):
                fused, plain = both_paths(
                    view, name, granularity, amax=amax, rounding=rounding, seed=2
                )
                try:
                    assert_same_qtensor(fused, plain)
                except AssertionError as error:
                    raise AssertionError(f"{layout} {amax} {rounding}: {error}") from error


@pytest.mark.parametrize(
    ("name", "granularity"),
    [("fp4_e2m1", "mx"), ("fp8_e4m3", "mx"), ("fp4_e2m1", "nvfp4"), ("fp8_e4m3", "block")],
    ids=str,
)
def test_hadamard_with_ragged_rows_and_special_values_matches_the_pytorch_path(name, granularity):
    from lowbit.formats.hadamard import random_signs

    signs = random_signs(64, 0)
    block = 32 if granularity == "block" else None
    cases = []
    for shape in [(1, 1), (3, 33), (5, 100), (40, 64)]:
        base = edge_tensor(shape, 8)
        base[torch.isnan(base)] = 1.0  # NaN spreads over its whole transform block
        cases.append((shape, base, 5))
    assert_paths_agree(cases, name, granularity, block_size=block, hadamard=signs)


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("name", list(ML_DTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_mx_quantization_equals_an_ml_dtypes_reference(name, dtype, fused):
    """OCP MX v1.0 §6.3 computed with numpy and ml_dtypes: the scale
    2**(floor(log2 amax) - emax_elem) (an e8m0 value), the elements x / scale clipped to the
    element format's max (saturating, as lowbit casts do) and rounded by ml_dtypes."""
    element = ML_DTYPES[name]
    fmt_max = float(ml_dtypes.finfo(element).max)
    emax_elem = int(np.floor(np.log2(fmt_max)))
    x = edge_tensor((9, 96), 3)
    grid = np.unique(np.abs(grid_and_ties(name)))
    mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
    ties = np.resize(mids, 31) * np.resize([1, -1], 31)  # the block's scale is 1: ties stay ties
    x[0, :32] = torch.from_numpy(np.append(ties, fmt_max).astype(np.float32))
    x = x.to(dtype)
    x[~torch.isfinite(x)] = 2.0  # the reference below is for finite blocks
    with on_path(fused):
        q = quantize(x, name, "mx")
    blocks = x.float().numpy().reshape(9, 3, 32)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    exponent = np.floor(np.log2(amax, where=amax > 0, out=np.full_like(amax, -np.inf)))
    exponent = np.clip(exponent - emax_elem, -127, 127)
    scale = np.exp2(exponent.astype(np.float64)).astype(np.float32)
    assert np.array_equal(
        scale.astype(ml_dtypes.float8_e8m0fnu).astype(np.float32), scale
    )  # an e8m0 value
    scaled = np.clip(blocks.astype(np.float64) / scale, -fmt_max, fmt_max).astype(np.float32)
    expected = scaled.astype(element).astype(np.float32).reshape(9, 96)
    assert np.array_equal(q.scale.numpy(), scale.reshape(9, 3))
    got = q.values.float().numpy()
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


FOLD_SCHEMES = [
    ("fp4_e2m1", "mx", None, None),
    ("fp8_e4m3", "mx", None, "mx_ceil"),
    ("fp6_e3m2", "mx", None, None),
    ("fp8_e5m2", "mx", None, None),
    ("fp8_e4m3", "block", 128, "pow2"),
    ("fp8_e4m3", "axis", None, "pow2"),
    ("fp8_e4m3", "block2d", (16, 32), "pow2"),
    ("fp4_e2m1", "nvfp4", None, None),
    ("fp4_e2m1", "nvfp4", (16, 16), None),
]


@pytest.mark.parametrize(("name", "granularity", "block", "rule"), FOLD_SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_folded_operand_and_recovered_values_match_the_pytorch_path(
    name, granularity, block, rule, dtype
):
    """The kernel's folded GEMM operand (values times block scales, bf16) is what the PyTorch
    path's `_fold` computes, and values recovered from it (``keep_values=False``) are the values,
    also for tiny (2**-127 scales), infinite and NaN blocks."""
    from lowbit.nn.gemm import _fold

    cases = []
    for seed, shape in enumerate([(1, 1), (3, 33), (17, 48), (32, 47)]):
        base = edge_tensor(shape, seed).to(dtype)
        if base.numel() > 40:
            base.view(-1)[:40] = base.view(-1)[:40] * 2.0**-120  # blocks of tiny scales
        cases.append((shape, base, seed))

    def same_fold(fused, plain):
        if fused.folded is not None:
            assert_same_bits(fused.folded, _fold(plain)[0])

    assert_paths_agree(
        cases,
        name,
        granularity,
        block_size=block,
        scale_rule=rule,
        fold=True,
        keep_values=False,
        extra=same_fold,
    )


@pytest.mark.parametrize(
    ("name", "granularity", "rule"),
    [("fp8_e4m3", "mx", "mx_ceil"), ("fp8_e4m3", "axis", "pow2"), ("fp6_e2m3", "mx", "mx_ceil")],
    ids=str,
)
def test_values_of_a_fold_that_overflows_are_the_formats_values(name, granularity, rule):
    """An amax near fp32's max: a pow2 / mx_ceil scale times the value it rounds to is 2**128
    (3.4e38 in e4m3: 256 * 2**120), inf in the folded operand (as the PyTorch path's fold gives
    it). The values read back from the kernel (``keep_values=False``) were that inf / scale = inf,
    no value of the format; they are the values the PyTorch path gives (256)."""
    x = torch.full((2, 64), 3.4e38)
    x[1] = torch.linspace(-1, 1, 64)
    q = quantize(x, name, granularity, scale_rule=rule, fold=True, keep_values=False)
    with kernels.disabled():
        plain = quantize(x, name, granularity, scale_rule=rule)
    assert torch.isfinite(q.values).all(), q.values
    assert_same_bits(q.values, plain.values)


def extreme_tensors(dtype):
    """Whole tensors at the edges of the range: subnormal only, zeros only, NaN, +-inf, near the
    dtype's max, and one value at each of the format maxima."""
    tiny = edge_tensor((6, 40), 1).abs().clamp(max=1.0).nan_to_num(0.0) * 2.0**-130
    finfo = torch.finfo(dtype)
    huge = torch.linspace(-finfo.max, finfo.max, 240).reshape(6, 40)
    maxima = torch.tensor([448.0, 57344.0, 28.0, 7.5, 6.0, 127.0] * 40).reshape(6, 40)
    yield "tiny", tiny.to(dtype)
    yield "bf16-subnormal", torch.full((6, 40), 2.0**-133).to(dtype)
    yield "zeros", torch.zeros(6, 40, dtype=dtype)
    yield "negative-zeros", torch.full((6, 40), -0.0, dtype=dtype)
    yield "nan", torch.full((6, 40), float("nan"), dtype=dtype)
    yield "inf", torch.tensor([float("inf"), -float("inf")] * 120, dtype=dtype).reshape(6, 40)
    yield "huge", huge.to(dtype)
    yield "maxima", maxima.to(dtype)
    yield "maxima-negated", (-maxima).to(dtype)


@pytest.mark.parametrize(("name", "granularity", "block", "rule"), SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_extreme_tensors_match_the_pytorch_path(name, granularity, block, rule, dtype):
    cases = [(what, base, 1) for what, base in extreme_tensors(dtype)]
    assert_paths_agree(cases, name, granularity, block_size=block, scale_rule=rule)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule", ["amax", "pow2"])
def test_axis_quantizer_matches_quantize_on_every_layout(dtype, rule):
    """`AxisQuantizer` (the lean int8 path's input quantizer) gives `quantize`'s bits."""
    from lowbit.formats.qtensor import AxisQuantizer

    quantizer = AxisQuantizer("int8", rule)
    for shape in [(1, 1), (3, 33), (17, 48), (2, 70001)]:
        for layout, x in layouts(edge_tensor(shape, 4).to(dtype)):
            assert quantizer.usable(x)
            with kernels.disabled():
                plain = quantize(x, "int8", "axis", scale_rule=rule)
            try:
                assert_same_qtensor(quantizer(x), plain)
            except AssertionError as error:
                raise AssertionError(f"{shape} {layout}: {error}") from error


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_measured_amax_on_every_layout(name, dtype):
    for shape in [(1, 1), (3, 33), (17, 48)]:
        for layout, x in layouts(edge_tensor(shape, 2).to(dtype)):
            for amax in (None, torch.tensor(3.0)):
                fused, plain = both_paths(x, name, "tensor", amax=amax, measure_amax=True)
                try:
                    assert_same_qtensor(fused, plain)
                    assert_same_bits(fused.measured_amax, plain.measured_amax)
                except AssertionError as error:
                    raise AssertionError(f"{shape} {layout} {amax}: {error}") from error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lean_int8_layer_on_edge_inputs_matches_the_pytorch_path(dtype):
    """The int8 layer's one-call forward and backward (lean_linear.cpp) against the general path
    with the kernels off, for inputs with NaN, inf, zero and subnormal rows, a zero weight row,
    and a transposed (non-contiguous) input."""
    import copy

    from lowbit import get_recipe
    from lowbit.nn import LowbitLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(33, 17).to(dtype)
    with torch.no_grad():
        linear.weight[3] = 0.0
        linear.weight[4, :5] = float("nan") if dtype == torch.float32 else 0.0
    layer = LowbitLinear(copy.deepcopy(linear), get_recipe("int8").layer)
    assert layer.lowbit_state.lean_quantizers is not None
    x = edge_tensor((33, 9), 3).t().to(dtype)  # transposed
    x[0] = 0.0
    x[1] = 1e-40
    grad = torch.randn(9, 17)

    def run():
        xg = x.detach().clone().requires_grad_()
        out = layer(xg)
        layer.zero_grad()
        out.backward(grad.to(out.dtype))
        return [out.detach(), xg.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]

    fused = run()
    with kernels.disabled():
        plain = run()
    for a, b in zip(fused, plain, strict=True):
        assert a.dtype == b.dtype
        assert_same_bits(a, b)


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_stochastic_rounding_lands_on_a_neighbour_on_the_ml_dtypes_grid(name, fused):
    """Each stochastically rounded value is a value of the format (by ml_dtypes) and one of the two
    grid neighbours of its input; grid values stay put."""
    element = ML_DTYPES[name]
    values = grid_and_ties(name)
    fmt_max = float(ml_dtypes.finfo(element).max)
    inside = values[np.abs(values) <= fmt_max]
    x = torch.from_numpy(np.tile(inside, 8)).reshape(8, -1)
    with on_path(fused):
        q = quantize(
            x,
            name,
            "tensor",
            amax=torch.tensor(fmt_max),
            rounding="stochastic",
            generator=torch.Generator().manual_seed(0),
        )
    got = q.values.float().numpy().reshape(-1)
    assert np.array_equal(got.astype(element).astype(np.float32), got)
    grid = np.unique(np.arange(256, dtype=np.uint8).view(element).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    flat = x.numpy().reshape(-1)
    lower = grid[np.searchsorted(grid, flat, side="right") - 1]
    upper = grid[np.minimum(np.searchsorted(grid, flat, side="left"), len(grid) - 1)]
    assert ((got == lower) | (got == upper)).all()


@pytest.mark.parametrize(("name", "granularity", "block", "rule"), SCHEMES, ids=str)
def test_float64_input_falls_back_to_the_fp32_results(name, granularity, block, rule):
    """float64 is not a kernel input: the PyTorch path rounds it to fp32 first, which gives what
    the kernel gives for ``x.float()``."""
    x = edge_tensor((17, 48), 3).double()
    q64 = quantize(x, name, granularity, block_size=block, scale_rule=rule)
    q32 = quantize(x.float(), name, granularity, block_size=block, scale_rule=rule)
    assert_same_qtensor(q64, q32)
