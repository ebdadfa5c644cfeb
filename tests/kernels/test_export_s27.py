"""Tracing converted models with fake tensors: `torch.export`, `torch.compile`, and each op's fake
implementation (`lowbit.kernels.fake`) against its kernel.

Without the fake implementations, ``torch.export.export`` of any model converted to a quantizing
recipe failed with ``UnsupportedOperatorException: lowbit.quantize_rows.default``. (An export
before any eager call, in a fresh process: tests/nn/test_compile_s29.py, whose fresh process
traces models before their first eager step.)
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit
from lowbit import kernels
from lowbit.formats import quantize


def converted(recipe):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    lowbit.convert(model, recipe)
    return model


@pytest.mark.parametrize(
    "recipe",
    [
        "fp8-tensorwise",
        "int8",
        "nvfp4",
        "fp8-blockwise",
        "mxfp4",
        "fp8-delayed",
        "mxfp8",  # whose quantization asked the block scales' values whether to keep its own
        "fp8-rowwise",
    ],
)
def test_an_exported_converted_model_gives_the_eager_bits(recipe):
    assert kernels.available(), f"the fused kernels did not build: {kernels.build_error()}"
    model = converted(recipe)
    x = torch.randn(4, 32)
    expected = model(x)
    program = torch.export.export(model, (x,))
    assert torch.equal(program.module()(x), expected)
    other = torch.randn(4, 32)
    assert torch.equal(program.module()(other), model(other))


@pytest.mark.parametrize(
    ("recipe", "backend"),
    [
        ("fp8-tensorwise", "aot_eager"),
        ("int8", "aot_eager"),
        ("mxfp8", "aot_eager"),
        ("mxfp4", "aot_eager"),
        ("fp8-tensorwise", "inductor"),
    ],
)
def test_a_compiled_converted_model_gives_the_eager_bits_forward_and_backward(recipe, backend):
    """With fake implementations the ops enter the compiled graph (they broke it before)."""
    torch._dynamo.reset()
    x = torch.randn(4, 32)
    grad = torch.randn(4, 16)

    def step(model):
        torch.manual_seed(1)  # the same stochastic-rounding seeds in both runs
        inputs = x.clone().requires_grad_()
        out = model(inputs)
        out.backward(grad)
        return [out, inputs.grad] + [p.grad for p in model.parameters()]

    eager = step(converted(recipe))
    compiled = step(torch.compile(converted(recipe), backend=backend))
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


def quantize_calls():
    """The ``quantize_rows`` calls that `quantize` makes for formats, granularities and options
    whose outputs differ in shape, dtype or strides."""
    x = torch.randn(6, 40)
    signs = torch.randint(0, 2, (16,)).float() * 2 - 1
    return [
        lambda: quantize(x, "fp8_e4m3", measure_amax=True),
        lambda: quantize(x, "fp8_e4m3", amax=torch.tensor(3.0), measure_amax=True),
        lambda: quantize(x, "int8", "axis"),
        lambda: quantize(x, "fp8_e4m3", "mx", fold=True),
        lambda: quantize(x, "fp4_e2m1", "mx", fold=True, keep_values=False),
        lambda: quantize(torch.randn(40, 6).t(), "fp8_e4m3", "mx"),
        lambda: quantize(x, "fp8_e4m3", "block2d", block_size=(16, 16)),
        lambda: quantize(x, "fp4_e2m1", "nvfp4", rounding="stochastic"),
        lambda: quantize(x, "fp8_e4m3", "mx", block_size=16, hadamard=signs),
    ]


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lowbit":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def recorded(calls):
    recorder = Recorder()
    with recorder:
        for call in calls:
            call()
    return recorder.calls


def hand_made_calls():
    """The other ops, with the inputs their callers give them (lowbit.nn.gemm, .linear)."""
    ops = torch.ops.lowbit
    acc = torch.randint(-99, 99, (5, 7), dtype=torch.int32)
    row, col = torch.rand(5, 1), torch.rand(7, 1)
    grad_out, x, weight = torch.randn(5, 7), torch.randn(5, 3), torch.randn(7, 3)
    qx = torch.randint(-127, 128, (5, 3), dtype=torch.int8)
    bf16, fp32 = torch.bfloat16, torch.float32
    return [
        (ops.scale_rows_cols.default, (acc, row, col, None), {}),
        (ops.scale_rows_cols.default, (acc.bfloat16(), row, col, bf16), {}),
        (ops.add_scaled_rows_cols_.default, (torch.zeros(5, 7), acc, row, col), {}),
        (
            ops.add_scaled_blocks_.default,
            (torch.zeros(5, 7), torch.randn(3, 5, 7), torch.rand(3, 5), torch.rand(3, 7)),
            {},
        ),
        (
            ops.int_rows_linear.default,
            (qx, torch.rand(5, 1), weight, torch.randn(7), 127.0, 0, None, bf16),
            {},
        ),
        (
            ops.int_rows_linear.default,
            (qx, torch.rand(5, 1), weight, None, 127.0, 0, None, fp32),
            {},
        ),
        (
            ops.cast_linear_backward.default,
            (grad_out, x, weight, True, True, True, bf16, bf16, bf16, bf16, fp32, fp32, True),
            {},
        ),
        (
            ops.cast_linear_backward.default,
            (grad_out, x, weight, True, False, False, bf16, fp32, bf16, bf16, bf16, fp32, False),
            {},
        ),
        (ops.operand_stats.default, (x, x.bfloat16(), torch.ones(1), 448.0), {}),
    ]


def test_every_op_has_a_fake_implementation_that_matches_its_kernel():
    """`torch.library.opcheck` runs each op on fake tensors and compares shapes, dtypes and
    strides with the kernel's outputs (and its schema, and its use under AOT autograd)."""
    assert kernels.available(), f"the fused kernels did not build: {kernels.build_error()}"
    calls = recorded(quantize_calls()) + hand_made_calls()
    checked = {func.__name__.split(".")[0] for func, _, _ in calls}
    defined = {
        name.removeprefix("lowbit::")
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("lowbit::")
    }
    assert defined <= checked, f"no sample call for {defined - checked}"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)
