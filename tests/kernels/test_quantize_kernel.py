"""The fused CPU quantization kernel against the PyTorch path, bit for bit.

tests/formats/test_fast_paths.py runs every format and granularity through both paths against the
reference algorithm; these tests cover what only the kernel has: external amaxes, several threads,
and the fallback when it is switched off.
"""

import contextlib
import subprocess
import sys

import pytest
import torch

from lowbit import kernels
from lowbit.formats import quantize
from tests.formats.test_fast_paths import assert_same_bits, awkward_tensor


def both_paths(*args, seed=None, **kwargs):
    """`quantize` through the kernel and through the PyTorch path; ``seed``: each call draws its
    stochastic rounding from a fresh generator of that seed (the same draws on both paths)."""
    assert kernels.available(), f"the fused kernels did not build: {kernels.build_error()}"

    def run():
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return quantize(*args, generator=generator, **kwargs)

    fused = run()
    with kernels.disabled():
        plain = run()
    return fused, plain


def assert_same_qtensor(a, b):
    assert_same_bits(a.values, b.values)
    assert_same_bits(a.scale, b.scale)
    assert (a.tensor_scale is None) == (b.tensor_scale is None)
    if a.tensor_scale is not None:
        assert_same_bits(a.tensor_scale, b.tensor_scale)
    assert (a.block, a.axis, a.scale_rule, a.granularity) == (
        b.block,
        b.axis,
        b.scale_rule,
        b.granularity,
    )


@pytest.mark.parametrize(
    ("name", "granularity", "amax"),
    [
        ("fp8_e4m3", "tensor", torch.tensor(3.0)),
        ("fp8_e5m2", "tensor", torch.tensor(float("inf"))),
        ("int8", "tensor", torch.tensor(0.0)),
        ("fp8_e4m3", "axis", torch.linspace(0, 50, 48)),
        ("int8", "axis", torch.linspace(1e-3, 5, 48)),
        ("fp4_e2m1", "nvfp4", torch.tensor(1e4)),
        ("fp4_e2m1", "nvfp4", torch.tensor(0.0)),
    ],
    ids=str,
)
def test_external_amax_matches_the_pytorch_path(name, granularity, amax):
    x = awkward_tensor((48, 256)) * 1e-3
    fused, plain = both_paths(x, name, granularity, amax=amax)
    assert_same_qtensor(fused, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "transposed"])
@pytest.mark.parametrize("special", [None, "nan", "inf", "zeros"])
@pytest.mark.parametrize("amax", [None, torch.tensor(3.0)], ids=["current", "delayed"])
def test_the_amax_measured_while_quantizing_is_the_tensor_amax(dtype, layout, special, amax):
    """Delayed scaling's history takes the tensor's amax from the quantization's own pass: the
    same bits as `tensor_amax` (NaN wins over inf, -0 reads +0), and the same quantized values as
    a call that does not measure."""
    from lowbit.formats import tensor_amax

    x = awkward_tensor((96, 64)) * 1e-3
    if special == "nan":
        x[70, 5] = float("nan")
        x[3, 1] = float("inf")
    elif special == "inf":
        x[70, 5] = -float("inf")
    elif special == "zeros":
        x = -torch.zeros(96, 64)
    x = x.to(dtype)
    x = x.t().contiguous().t() if layout == "transposed" else x
    fused, plain = both_paths(x, "fp8_e5m2", "tensor", amax=amax, measure_amax=True)
    assert_same_qtensor(fused, plain)
    assert_same_qtensor(fused, quantize(x, "fp8_e5m2", "tensor", amax=amax))
    for q in (fused, plain):
        assert q.measured_amax.shape == () and q.measured_amax.dtype == torch.float32
        assert_same_bits(q.measured_amax, tensor_amax(x))
    assert quantize(x, "fp8_e5m2", "tensor", amax=amax).measured_amax is None


def test_measuring_the_amax_needs_one_amax_for_the_tensor():
    from lowbit.errors import UsageError

    with pytest.raises(UsageError, match="measure_amax needs granularity 'tensor'"):
        quantize(torch.randn(4, 32), "fp8_e4m3", "mx", measure_amax=True)


@pytest.mark.parametrize(
    ("name", "granularity", "block"),
    [
        ("fp8_e4m3", "tensor", None),
        ("fp4_e2m1", "mx", None),
        ("fp4_e2m1", "nvfp4", None),
        ("fp8_e4m3", "axis", None),
    ],
)
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_several_threads_give_the_one_thread_result(name, granularity, block, transposed):
    x = awkward_tensor((512, 1024))
    x[300, 7] = 1e6  # the tensor amax in one thread's half only
    if transposed:  # per-row scales split the rows among the threads
        x = x.t().contiguous().t()
    threads = torch.get_num_threads()
    one = quantize(x, name, granularity, block_size=block)
    torch.set_num_threads(4)
    try:
        many = quantize(x, name, granularity, block_size=block)
    finally:
        torch.set_num_threads(threads)
    assert_same_qtensor(one, many)
    with kernels.disabled():
        assert_same_qtensor(one, quantize(x, name, granularity, block_size=block))


@pytest.mark.parametrize(("name", "granularity"), [("int8", "axis"), ("fp4_e2m1", "mx")])
def test_stochastic_rounding_of_a_transposed_operand_over_threads_draws_the_same_noise(
    name, granularity
):
    x = awkward_tensor((1024, 200)).t()  # 200 rows: split among 4 threads when one block per row

    def draw():
        generator = torch.Generator().manual_seed(5)
        return quantize(x, name, granularity, rounding="stochastic", generator=generator)

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        many = draw()
    finally:
        torch.set_num_threads(threads)
    with kernels.disabled():
        assert_same_qtensor(many, draw())


def test_unpadded_ragged_blocks_are_refused_as_on_the_pytorch_path():
    x = torch.randn(4, 50)
    with pytest.raises(Exception, match="does not divide into 1x32 blocks"):
        quantize(x, "fp8_e4m3", "mx", pad=False)
    with pytest.raises(Exception, match="does not divide into 16x16 blocks"):
        quantize(torch.randn(20, 32), "fp4_e2m1", "nvfp4", block_size=(16, 16), pad=False)


def test_switched_off_kernels_fall_back_to_the_same_values(tmp_path):
    """``LOWBIT_KERNELS=0``: nothing is built or loaded, and quantize gives the same values."""
    x = awkward_tensor((16, 64))
    torch.save(x, tmp_path / "x.pt")
    expected = quantize(x, "fp4_e2m1", "mx")
    torch.save(expected.values, tmp_path / "expected.pt")
    script = (
        "import sys, torch; from lowbit import kernels; from lowbit.formats import quantize\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "q = quantize(x, 'fp4_e2m1', 'mx')\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert not kernels.available()\n"
        "assert torch.equal(q.values.view(torch.int16), e.view(torch.int16))\n"
        "print('fallback ok')\n"
    )
    env = {"LOWBIT_KERNELS": "0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


@pytest.mark.parametrize(
    ("name", "granularity", "rule"),
    [
        ("fp4_e2m1", "mx", "mx_ceil"),
        ("fp4_e2m1", "nvfp4", None),
        ("fp8_e5m2", "tensor", None),
        ("fp6_e3m2", "mx", None),
        ("int8", "axis", None),
        ("fp4_e2m1", "nvfp4 16x16", None),
        ("fp8_e4m3", "block2d 16x32", None),
    ],
    ids=str,
)
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("shape", [(48, 256), (5, 50), (150, 64)], ids=str)
def test_stochastic_rounding_draws_the_same_noise_as_the_pytorch_path(
    name, granularity, rule, shape, transposed
):
    x = awkward_tensor(shape)
    x.view(-1)[7] = float("nan") if name != "int8" else 0.0
    if transposed:  # the weight gradient's operands: quantized across a contiguous axis
        x = x.t().contiguous().t()

    granularity, _, tile = granularity.partition(" ")
    block = tuple(int(n) for n in tile.split("x")) if tile else None
    fused, plain = both_paths(
        x, name, granularity, block_size=block, scale_rule=rule, rounding="stochastic", seed=3
    )
    assert_same_qtensor(fused, plain)


# Schemes whose scales fold exactly into the GEMM operand (the kernel writes `folded` for them).
FOLDED_SCHEMES = [
    ("fp8_e4m3", "mx", None, None),
    ("fp4_e2m1", "mx", "mx_ceil", None),
    ("fp4_e2m1", "nvfp4", None, None),
    ("fp4_e2m1", "nvfp4", None, (16, 16)),
    ("fp8_e4m3", "block", "pow2", 64),
    ("fp8_e4m3", "axis", "pow2", None),  # fp8-rowwise: power-of-two row scales
]


@pytest.mark.parametrize(("name", "granularity", "rule", "block"), FOLDED_SCHEMES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_folded_operand_equals_the_gemm_fold_of_the_pytorch_path(
    name, granularity, rule, block, transposed
):
    """The kernel's folded values are what `emulated_gemm` would compute from values and scales."""
    from lowbit.nn.gemm import _fold

    x = awkward_tensor((48, 200))
    x[0, :] = 1e30  # a block far above the rest: bf16 range matters for the product
    if transposed:
        x = x.t().contiguous().t()
    fused, plain = both_paths(x, name, granularity, scale_rule=rule, block_size=block, fold=True)
    assert fused.folded is not None and plain.folded is None
    assert quantize(x, name, granularity, scale_rule=rule, block_size=block).folded is None
    fused_values, fused_rest = _fold(fused)
    plain_values, plain_rest = _fold(plain)
    assert_same_bits(fused_values, plain_values)
    assert_same_bits(fused_rest, plain_rest)


@pytest.mark.parametrize(("name", "granularity", "rule", "block"), FOLDED_SCHEMES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_folded_only_quantization_gives_back_the_values_it_did_not_write(
    name, granularity, rule, block, rounding, transposed
):
    """``keep_values=False``: the kernel writes the folded operand only, and the values read back
    from it are the bits it writes otherwise: zero, negative-zero, subnormal and NaN blocks, blocks
    far above the rest, and NVFP4 blocks whose scale underflows to zero (beside the 1e30 row)."""
    finite = awkward_tensor((48, 200))
    finite[0, :] = 1e30
    with_nan = finite.clone()
    with_nan[5, 70] = float("nan")  # (an NVFP4 tensor scale of 1 then: no block underflows)
    for x, has_nan in ((finite, False), (with_nan, True)):
        if transposed:
            x = x.t().contiguous().t()
        options = dict(scale_rule=rule, block_size=block, rounding=rounding, fold=True)
        both = quantize(x, name, granularity, generator=seeded(3), **options)
        folded_only = quantize(
            x, name, granularity, generator=seeded(3), keep_values=False, **options
        )
        assert folded_only.shape == both.shape
        assert_same_bits(folded_only.folded, both.folded)
        assert_same_qtensor(folded_only, both)
        if granularity == "nvfp4" and not has_nan:  # the underflow case is exercised
            assert (both.scale == 0).any()


@pytest.mark.parametrize(("name", "granularity"), [("fp8_e4m3", "tensor"), ("int8", "axis")])
def test_values_are_kept_where_nothing_is_folded(name, granularity):
    """``keep_values=False`` only drops the values that a folded operand stands for."""
    x = awkward_tensor((48, 200))
    kept = quantize(x, name, granularity, fold=True)
    asked_to_drop = quantize(x, name, granularity, fold=True, keep_values=False)
    assert asked_to_drop.folded is None
    assert_same_qtensor(asked_to_drop, kept)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("row_count", "col_count"), [(37, 1), (1, 1), (37, 53), (1, 53)])
def test_row_column_scaling_equals_two_pytorch_multiplies(dtype, out_dtype, row_count, col_count):
    from lowbit.nn.gemm import scale_rows_cols

    acc = (torch.randn(37, 53) * 2**26).to(dtype)  # int32 beyond 2**24: the fp32 conversion rounds
    row = torch.rand(row_count, 1) * 1e-3
    col = torch.rand(col_count, 1) * 1e-4
    expected = acc.float().clone().mul_(row).mul_(col.t()).to(out_dtype)
    assert_same_bits(scale_rows_cols(acc.clone(), row, col, out_dtype), expected)
    with kernels.disabled():
        assert_same_bits(scale_rows_cols(acc.clone(), row, col, out_dtype), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("row_count", "col_count"), [(37, 1), (1, 1), (37, 53)])
def test_accumulating_a_scaled_partial_product_equals_pytorch(dtype, row_count, col_count):
    from lowbit.nn.gemm import add_scaled_rows_cols_

    total = torch.randn(37, 53)
    acc = (torch.randn(37, 53) * 100).to(dtype)
    row = torch.rand(row_count, 1) * 1e-3
    col = torch.rand(col_count, 1) * 1e-4
    expected = total + (acc.float() * row) * col.t()
    assert_same_bits(add_scaled_rows_cols_(total.clone(), acc, row, col), expected)
    with kernels.disabled():
        assert_same_bits(add_scaled_rows_cols_(total.clone(), acc, row, col), expected)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.bfloat16])
def test_summing_scaled_block_products_adds_them_in_order_like_pytorch(dtype):
    from lowbit.nn.gemm import add_scaled_blocks_

    total = torch.randn(37, 53)
    partials = (torch.randn(5, 37, 53) * 2**20).to(dtype)
    row = torch.rand(5, 37) * 1e-3
    col = torch.rand(5, 53) * 1e-4
    expected = total.clone()
    for k in range(5):  # block after block, each rounded to fp32 as it is added
        expected = expected + (partials[k].float() * row[k, :, None]) * col[k, None, :]
    assert_same_bits(add_scaled_blocks_(total.clone(), partials, row, col), expected)
    with kernels.disabled():
        assert_same_bits(add_scaled_blocks_(total.clone(), partials, row, col), expected)


def test_bf16_output_rounds_ties_to_even_like_pytorch():
    from lowbit.nn.gemm import scale_rows_cols

    # fp32 values exactly halfway between two bf16 values (low 16 bits 0x8000), both parities,
    # plus inf, nan and the largest finite fp32 (rounds to inf in bf16).
    halfway = (torch.arange(-64, 64, dtype=torch.int32) * 0x10000 + 0x3F808000).view(torch.float32)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.4028235e38, -0.0])
    acc = torch.cat([halfway, special]).reshape(1, -1)
    one = torch.ones(1, 1)
    assert_same_bits(scale_rows_cols(acc, one, one, torch.bfloat16), acc.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("name", "granularity", "rule", "block", "n"),
    [
        ("fp4_e2m1", "mx", "mx_ceil", None, 64),  # mxfp4's backward operands
        ("fp4_e2m1", "mx", None, None, 128),  # blocks of the transform beyond a register chunk
        ("fp4_e2m1", "nvfp4", None, None, 16),  # nvfp4's weight-gradient operands
        ("fp8_e4m3", "block", None, 8, 8),  # transform blocks below one vector
        ("fp8_e4m3", "block", None, 2, 2),
        ("int8", "block", None, 1, 1),  # n = 1: the signs alone
    ],
    ids=str,
)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("shape", [(48, 344), (150, 64), (5, 50)], ids=str)
def test_hadamard_transform_inside_the_kernel_equals_transforming_first(
    name, granularity, rule, block, n, rounding, dtype, transposed, shape
):
    """The kernel transforms each block while quantizing (padding K to whole transform blocks);
    the PyTorch path runs `lowbit.formats.hadamard.transform` first: the same bits."""
    from lowbit.formats.hadamard import padded_length, random_signs

    x = awkward_tensor(shape).to(dtype)
    x[1, :] *= 1e4  # an outlier row
    x.view(-1)[7] = float("nan") if name != "int8" else 0.0
    if transposed:
        x = x.t().contiguous().t()
    signs = random_signs(n, seed=5)
    fused, plain = both_paths(
        x,
        name,
        granularity,
        block_size=block,
        scale_rule=rule,
        rounding=rounding,
        fold=True,
        hadamard=signs,
        seed=3,
    )
    assert fused.shape == (shape[0], padded_length(shape[1], n))
    assert_same_qtensor(fused, plain)
    assert (fused.folded is not None) == (granularity in ("mx", "nvfp4"))  # exact folds only
    if fused.folded is not None:  # the folded operand is the GEMM's fold of the same values
        from lowbit.nn.gemm import _fold

        for mine, theirs in zip(_fold(fused), _fold(plain), strict=True):
            assert_same_bits(mine, theirs)


def test_hadamard_transform_inside_the_kernel_over_threads_gives_the_one_thread_result():
    from lowbit.formats.hadamard import random_signs

    x = awkward_tensor((300, 4096)).t()  # a weight gradient's transposed operand
    signs = random_signs(64, seed=1)
    results = []
    for threads in (1, 2, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            generator = torch.Generator().manual_seed(0)
            results.append(
                quantize(
                    x, "fp4_e2m1", "mx", rounding="stochastic", generator=generator, hadamard=signs
                )
            )
        finally:
            torch.set_num_threads(previous)
    for other in results[1:]:
        assert_same_qtensor(results[0], other)


def test_delayed_scaling_trains_the_same_with_and_without_the_kernel():
    """fp8-delayed measures each step's amax inside the kernel's rounding pass and in a separate
    pass on the PyTorch path: the same histories, outputs and gradients step after step."""
    import copy

    from lowbit import get_recipe
    from lowbit.nn import LowbitLinear

    torch.manual_seed(0)
    layer = LowbitLinear(torch.nn.Linear(64, 48, bias=False), get_recipe("fp8-delayed").layer)
    inputs = [torch.randn(32, 64) * scale for scale in (1.0, 4.0, 0.5, 2.0)]
    grads = [torch.randn(32, 48) * scale for scale in (1e-3, 1.0, 10.0, 0.1)]

    def train(layer, kernel):
        seen = []
        for x, grad in zip(inputs, grads):
            layer.weight.grad = None
            x = x.clone().requires_grad_()
            with contextlib.nullcontext() if kernel else kernels.disabled():
                out = layer(x)
                out.backward(grad)
            layer.lowbit_state.commit()
            state = layer.lowbit_state.state_dict()
            seen.append((out, x.grad, layer.weight.grad, [h["history"] for h in state.values()]))
        return seen

    for fused, plain in zip(train(copy.deepcopy(layer), True), train(layer, False)):
        for a, b in zip(fused[:3], plain[:3]):
            assert_same_bits(a, b)
        for a, b in zip(fused[3], plain[3]):
            assert_same_bits(a, b)
    assert len(fused[3]) == 3  # x, w and grad_out keep histories (the backward reuses x and w)
    newest_first = torch.stack([x.abs().max() for x in reversed(inputs)])
    assert torch.equal(layer.lowbit_state.histories["forward.x"].history[:4], newest_first)
