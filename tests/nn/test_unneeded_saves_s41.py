"""Session 41: a converted layer saves for the backward only what the gradient GEMMs that will run
need.

A layer whose input needs no gradient (a CNN's first convolution reads the image) runs no
input-gradient GEMM, and one whose weight is frozen (``requires_grad_(False)``, a LoRA-style
fine-tune) no weight-gradient GEMM. They still saved that GEMM's operand: the first layer its
quantized weight (tensorwise recipes), the frozen layer its input or its quantization. The
gradients that are computed keep their bits."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.recipes.presets import parse_override
from tests.nn.test_conv_saved_s41 import _saved_bytes

RECIPES = (
    "fp8-tensorwise",
    "fp8-delayed",
    "fp8-rowwise",
    "fp8-blockwise",
    "mxfp8",
    "nvfp4",
    "int8",
)


def _precision(recipe: str) -> lowbit.Precision:
    """``recipe`` converting the model's one layer (nvfp4 keeps a first and a last layer)."""
    preset = lowbit.get_recipe(recipe)
    return lowbit.Precision(preset.with_overrides(parse_override(f"0={recipe}", preset)))


def _converted(recipe: str, layer: nn.Module) -> nn.Sequential:
    model = nn.Sequential(layer)
    _precision(recipe).convert(model)
    assert type(model[0]).__name__.startswith("Lowbit"), recipe
    return model


def _run(recipe, make, x, frozen: bool):
    """Saved bytes and the gradients of a fresh converted ``make()`` on ``x`` (its weight frozen
    or not), for one backward of a fixed output gradient."""
    torch.manual_seed(0)
    model = _converted(recipe, make())
    model[0].weight.requires_grad_(not frozen)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with _precision(recipe).autocast():
        out, saved = _saved_bytes(model, x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out.to(out.dtype))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return saved, out.detach(), x.grad, grads


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_frozen_weight_keeps_no_input_for_a_weight_gradient(recipe):
    """A linear layer with a frozen weight saves at most a quantized copy of its weight (the
    input gradient's operand), not its input (256 KiB here) nor the input's quantization; its
    output and input and bias gradients are those of the same layer with a trainable weight."""
    x = torch.randn(256, 256, requires_grad=True)
    make = lambda: nn.Linear(256, 64)  # noqa: E731
    saved, out, grad_x, grads = _run(recipe, make, x, frozen=True)
    assert saved <= 64 * 256 * 2 + 64, saved
    _, want_out, want_x, want_grads = _run(recipe, make, x, frozen=False)
    assert torch.equal(out, want_out)
    assert torch.equal(grad_x, want_x)
    assert set(grads) == {"0.bias"}
    assert torch.equal(grads["0.bias"], want_grads["0.bias"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_first_convolution_keeps_no_weight_copy(recipe):
    """A grouped convolution reading an image that needs no gradient saves at most the image's
    bytes (the image itself, or its quantization), not a
    quantized copy of its weight (36 K values here, against 2 K pixels) for an input gradient
    that is never computed; its weight and bias gradients are those of the same layer on an
    image that needs one (but under nvfp4, whose stochastic rounding of the gradients draws
    random numbers in the input gradient's GEMM first, shifting the weight gradient's)."""
    image = torch.randn(2, 64, 4, 4)
    make = lambda: nn.Conv2d(64, 128, 3, padding=1, groups=2)  # noqa: E731
    saved, out, _, grads = _run(recipe, make, image, frozen=False)
    assert saved <= image.nbytes + 64, saved
    _, want_out, _, want_grads = _run(recipe, make, image.requires_grad_(), frozen=False)
    assert torch.equal(out, want_out)
    assert grads.keys() == want_grads.keys() == {"0.weight", "0.bias"}
    if recipe == "nvfp4":
        return
    for name, grad in grads.items():
        assert torch.equal(grad, want_grads[name]), name


def test_a_frozen_fp8_layer_s_input_gradient_is_the_formats_own_gemm():
    """A frozen fp8-tensorwise layer keeps its e4m3 weight copy alone (not its input), and its
    input gradient is what the formats compute on plain torch ops: grad_out cast to e5m2 and the weight to e4m3, each divided by its scale
    ``amax / max``, multiplied (a bf16 GEMM on the CPU, which holds fp8 values exactly, with a
    bf16 output) and scaled back."""
    torch.manual_seed(0)
    model = _converted("fp8-tensorwise", nn.Linear(64, 32, bias=False))
    model[0].weight.requires_grad_(False)
    x = torch.randn(16, 64, requires_grad=True)
    grad_out = torch.randn(16, 32)
    out, saved = _saved_bytes(model, x)
    assert saved <= 32 * 64 * 2 + 64, saved
    out.backward(grad_out)

    def cast(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = t.abs().max() / torch.finfo(dtype).max
        return (t / scale).to(dtype), scale

    (g, g_scale), (w, w_scale) = (
        cast(grad_out, torch.float8_e5m2),
        cast(model[0].weight.detach(), torch.float8_e4m3fn),
    )
    product = (g.bfloat16() @ w.bfloat16()).float()
    assert torch.equal(x.grad, product * (g_scale * w_scale))
