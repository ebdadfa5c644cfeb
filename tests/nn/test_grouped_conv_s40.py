"""Session 40: grouped and transposed convolutions are converted like any Conv2d, each group's
three GEMMs quantized along that group's contraction axis, depthwise ones kept with the reason; and
the router overrides match module names literally."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.data.digits import load_digit_splits
from lowbit.models.cnn import build_cnn
from lowbit.nn.conv import DEPTHWISE_KEPT
from lowbit.nn.convert import router_overrides
from lowbit.nn.gemm import exact_accumulation
from lowbit.nn.operand import quantize_operand
from lowbit.recipes import get_recipe

# recipes whose backward GEMMs are deterministic (no stochastic rounding, no Hadamard transform)
DETERMINISTIC = ("fp8-tensorwise", "fp8-rowwise", "mxfp8", "int8")


def _model(groups: int) -> nn.Sequential:
    """A grouped 3x3 convolution (8 -> 8 channels) between two plain ones: nvfp4 keeps a model's
    first and last GEMM layer, so the middle one is converted by every recipe that converts."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=groups),
        nn.Conv2d(8, 4, 1),
    )


def _quantized(t: torch.Tensor, spec) -> torch.Tensor:
    """``t`` (2-D) quantized along its last axis by the format's own cast, dequantized, in fp64."""
    return quantize_operand(t.contiguous(), spec).dequantize().double()


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum())).item()


def _reference(conv: nn.Conv2d, spec, x, grad_out, groups: int):
    """The grouped convolution's output and gradients from its three GEMMs per group, each
    operand quantized along that GEMM's contraction axis (C/G*9 columns, O/G outputs, N*L
    tokens), products in fp64: plain PyTorch ops on the quantized operands."""
    n, _, h, w = x.shape
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(n * h * w, -1)  # N*L x C/G*9*G
    go = grad_out.permute(0, 2, 3, 1).reshape(n * h * w, -1)  # N*L x O
    weight = conv.weight.detach().reshape(conv.out_channels, -1)
    outs, grad_cols, grad_ws = [], [], []
    for cols_g, go_g, w_g, b_g in zip(
        cols.chunk(groups, 1), go.chunk(groups, 1), weight.chunk(groups), conv.bias.chunk(groups)
    ):
        fwd = _quantized(cols_g, spec.forward.a) @ _quantized(w_g, spec.forward.b).T
        outs.append(fwd + b_g.detach().double())
        grad_in = spec.grad_input
        grad_cols.append(_quantized(go_g, grad_in.a) @ _quantized(w_g.T, grad_in.b).T)
        grad_w = spec.grad_weight
        grad_ws.append(_quantized(go_g.T, grad_w.a) @ _quantized(cols_g.T, grad_w.b).T)
    out = torch.cat(outs, 1).reshape(n, h, w, -1).permute(0, 3, 1, 2)
    grad_cols = torch.cat(grad_cols, 1).reshape(n, h * w, -1).transpose(1, 2)
    grad_x = F.fold(grad_cols, (h, w), 3, padding=1)
    return out, grad_x, torch.cat(grad_ws).reshape(conv.weight.shape)


def _check_against(want, recipe, conv, plain, x, out, grad_out, weight_db: float) -> None:
    """``out`` and the gradients of ``conv`` against ``want`` (the reference's output and
    gradients on the quantized operands): to fp32 accumulation order where the backward is
    deterministic; nvfp4's stochastically rounded, Hadamard-transformed gradients by their SQNR
    against the full-precision ``plain`` layer (e2m1: ~16 dB on a normal tensor)."""
    want_out, want_grad_x, want_grad_w = want
    assert _sqnr(want_out, out) > 100  # fp32 accumulation order only
    if recipe in DETERMINISTIC:
        assert _sqnr(want_grad_x, x.grad) > 100
        assert _sqnr(want_grad_w, conv.weight.grad) > 100
    else:
        x_plain = x.detach().clone().requires_grad_()
        plain(x_plain).backward(grad_out)
        assert _sqnr(x_plain.grad, x.grad) > 12
        assert _sqnr(plain.weight.grad, conv.weight.grad) > weight_db
    torch.testing.assert_close(conv.bias.grad, grad_out.sum((0, 2, 3)))


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("recipe", [*DETERMINISTIC, "nvfp4"])
def test_a_grouped_convolution_computes_each_groups_quantized_gemms(recipe, groups):
    """A grouped Conv2d was kept in high precision ("grouped convolution (groups > 1) is not
    converted"). Converted, its output and both gradients are those of each group's GEMMs on
    operands quantized per group (mxfp8's blocks of 32 within a group's 18 or 36 columns,
    zero-padded as a linear layer's K of 18): to fp32 accumulation where the backward is deterministic; nvfp4's
    stochastically rounded, Hadamard-transformed gradients by their SQNR against the full-precision
    convolution."""
    model = _model(groups)
    plain = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    plain.load_state_dict(model[1].state_dict())
    report = lowbit.convert(model, recipe)
    assert "1" in report.converted
    spec = get_recipe(recipe).layer_for("1")[0]
    conv = model[1]
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    grad_out = torch.randn(2, 8, 5, 5)
    with exact_accumulation():
        out = conv(x)
        out.backward(grad_out)
    want = _reference(conv, spec, x.detach(), grad_out, groups)
    _check_against(want, recipe, conv, plain, x, out, grad_out, weight_db=8)


def test_the_report_and_repr_show_a_grouped_convolution_converted():
    model = _model(4)
    report = lowbit.convert(model, "fp8-rowwise")
    assert report.summary() == "converted 3/3 layers"
    assert "groups=4" in repr(model[1])
    with pytest.raises(RuntimeError, match="Given groups=4, weight of size"):
        model[1](torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "mxfp8", "nvfp4"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_a_depthwise_convolution_is_kept_with_the_reason(recipe, transposed):
    """A depthwise convolution (groups = in_channels) was converted: 3*C GEMMs of K = kh*kw per
    step in a Python loop, ~60x slower than nn.Conv2d (review R2). Kept, it computes as
    nn.Conv2d does, and the report says why; the grouped convolution beside it is converted."""
    torch.manual_seed(0)
    kind = nn.ConvTranspose2d if transposed else nn.Conv2d
    depthwise = kind(8, 8, 3, padding=1, groups=8)
    plain = kind(8, 8, 3, padding=1, groups=8)
    plain.load_state_dict(depthwise.state_dict())
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), depthwise, kind(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 4, 1)
    )
    report = lowbit.convert(model, recipe)
    assert report.kept["1"] == DEPTHWISE_KEPT
    assert "2" in report.converted
    assert f"kept 1: {DEPTHWISE_KEPT}: 1" in report.summary()
    assert type(model[1]) is kind
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(model[1](x), plain(x), rtol=0, atol=0)


def test_the_digits_cnn_with_a_grouped_convolution_trains_in_mxfp8():
    """The digits CNN with a 4-group 3x3 convolution after its first: every convolution is
    converted (the head is kept) and ten steps lower the loss."""
    torch.manual_seed(0)
    model = build_cnn("tiny")
    first = model.features[0].out_channels
    model.features.insert(2, nn.Conv2d(first, first, 3, padding=1, groups=4))
    model.features.insert(3, nn.ReLU())
    precision = lowbit.Precision("mxfp8")
    model = precision.convert(model)
    assert set(precision.conversion_report.converted) == {"features.0", "features.2", "features.4"}
    images, labels = load_digit_splits()["train"]
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-3))
    grouped = model.features[2].weight.detach().clone()
    losses = []
    for step in range(10):
        batch = slice(64 * step, 64 * step + 64)
        with precision.autocast():
            loss = F.cross_entropy(model(images[batch]).float(), labels[batch])
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert torch.isfinite(torch.tensor(losses)).all()
    assert sum(losses[-3:]) < sum(losses[:3])
    assert not torch.equal(model.features[2].weight, grouped)


class _Router(nn.Module):
    """A mixture-of-experts router holding a linear layer (Switch Transformers' ``classifier``)."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(8, 4)


def test_a_router_in_a_module_named_with_glob_characters_is_kept():
    """A router in a module named ``moe[0]`` (``add_module`` takes any name without a dot) was
    joined into the recipe's keep pattern as the glob ``moe[0].router.classifier``, which matches
    ``moe0.router.classifier`` and not itself: the router was converted to fp8."""
    model = nn.Module()
    for name in ("moe[0]", "moe1"):
        block = nn.Module()
        block.router = _Router()
        block.experts = nn.ModuleList([nn.Linear(8, 8)])
        model.add_module(name, block)
    report = lowbit.convert(model, "fp8-tensorwise")
    assert {"moe[0].router.classifier", "moe1.router.classifier"} <= set(report.kept)
    assert {"moe[0].experts.0", "moe1.experts.0"} <= set(report.converted)
    (kept,) = router_overrides(model)
    assert not kept.matches("moe0.router.classifier")


def _transposed_reference(conv: nn.ConvTranspose2d, spec, x, grad_out):
    """A transposed convolution's output and gradients from each group's three GEMMs: the forward
    ``x @ W`` per pixel (contracted over C/G) as F.conv_transpose2d on the quantized image and
    weight; the input gradient (over O/G*kh*kw, the unfolded output gradient) and the weight
    gradient (over N*H*W) as products of the quantized operands. fp64."""
    n, c, h, w = x.shape
    groups, options = conv.groups, dict(stride=conv.stride, dilation=conv.dilation)
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
    weight = conv.weight.detach().reshape(c, -1)  # C x O/G*kh*kw
    # the padding cut off the folded output, as F.unfold pads the output gradient back
    full = [
        (length - 1) * s + d * (k - 1) + 1
        for length, s, d, k in zip((h, w), conv.stride, conv.dilation, conv.kernel_size)
    ]
    (ph, pw), (eh, ew) = conv.padding, conv.output_padding
    grad_full = F.pad(grad_out, (pw, pw - ew, ph, ph - eh))
    assert list(grad_full.shape[2:]) == full
    grad_cols = F.unfold(grad_full, conv.kernel_size, **options).transpose(1, 2)
    grad_cols = grad_cols.reshape(n * h * w, -1)  # N*L x O*kh*kw
    image, kernel, grad_x, grad_w = [], [], [], []
    for rows_g, w_g, gc_g in zip(
        rows.chunk(groups, 1), weight.chunk(groups), grad_cols.chunk(groups, 1)
    ):
        image.append(_quantized(rows_g, spec.forward.a))
        kernel.append(_quantized(w_g.T, spec.forward.b).T)
        grad_in = spec.grad_input
        grad_x.append(_quantized(gc_g, grad_in.a) @ _quantized(w_g, grad_in.b).T)
        grad_wt = spec.grad_weight
        grad_w.append(_quantized(rows_g.T, grad_wt.b) @ _quantized(gc_g.T, grad_wt.a).T)
    image = torch.cat(image, 1).reshape(n, h, w, c).permute(0, 3, 1, 2)
    out = F.conv_transpose2d(
        image,
        torch.cat(kernel).reshape(conv.weight.shape),
        conv.bias.detach().double(),
        padding=conv.padding,
        output_padding=conv.output_padding,
        groups=groups,
        **options,
    )
    grad_x = torch.cat(grad_x, 1).reshape(n, h, w, c).permute(0, 3, 1, 2)
    return out, grad_x, torch.cat(grad_w).reshape(conv.weight.shape)


@pytest.mark.parametrize("recipe", [*DETERMINISTIC, "nvfp4"])
def test_a_transposed_convolution_computes_its_quantized_gemms(recipe):
    """nn.ConvTranspose2d was kept ("ConvTranspose2d is not converted"). Converted (here grouped,
    stride 2 with overlapping 3x3 kernel positions, padding and output_padding), its output is
    F.conv_transpose2d on the quantized image and weight, and its gradients each group's GEMMs on
    quantized operands, to fp32 accumulation; nvfp4's gradients by their SQNR."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    plain = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    plain.load_state_dict(layer.state_dict())
    model = nn.Sequential(nn.Conv2d(3, 8, 1), layer, nn.Conv2d(6, 4, 1))
    report = lowbit.convert(model, recipe)
    assert "1" in report.converted
    conv, spec = model[1], get_recipe(recipe).layer_for("1")[0]
    x = torch.randn(2, 8, 4, 5, requires_grad=True)
    grad_out = torch.randn(2, 6, 8, 10)
    with exact_accumulation():
        out = conv(x)
        out.backward(grad_out)
    assert out.shape == plain(x).shape == (2, 6, 8, 10)
    want = _transposed_reference(conv, spec, x.detach(), grad_out)
    _check_against(want, recipe, conv, plain, x, out, grad_out, weight_db=12)


def test_a_converted_transposed_convolution_takes_what_nn_conv_transpose2d_takes():
    """``output_size`` (which picks the output_padding), an unbatched image, and F.conv_transpose2d's
    error for a wrong channel count."""
    torch.manual_seed(0)
    plain = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)
    model = nn.Sequential(nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1))
    model[0].load_state_dict(plain.state_dict())
    assert list(lowbit.convert(model, "fp8-rowwise").converted) == ["0"]
    x = torch.randn(1, 4, 5, 5)
    got = model[0](x, output_size=[10, 10])
    want = plain(x, output_size=[10, 10])
    assert got.shape == want.shape == (1, 2, 10, 10)
    assert _sqnr(want, got) > 20
    assert model[0](x[0]).shape == plain(x[0]).shape == (2, 9, 9)
    with pytest.raises(RuntimeError, match="to have 4 channels, but got 3 channels"):
        model[0](torch.randn(1, 3, 5, 5))


@pytest.mark.parametrize("recipe", ["fp8-rowwise", "mxfp8"])
def test_a_transposed_convolution_under_bf16_autocast_saves_its_input_in_bf16(recipe):
    """The GEMM took ``rows.float()`` (for an fp32 result to fold), so under bf16 autocast the
    backward saved an fp32 copy of the bf16 input: twice the bytes nn.Conv2d's path saves
    (recipes that keep the input for the weight gradient). The same output and gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.ConvTranspose2d(16, 8, 2, stride=2), nn.Conv2d(8, 4, 1)
    )
    lowbit.convert(model, recipe)
    x = torch.randn(2, 16, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    grad_out = torch.randn(2, 8, 12, 12)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autocast("cpu", torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model[1](x)
        out32 = model[1](x32)
    inputs = [t for t in saved if t.shape == (2 * 6 * 6, 16)]  # the image's rows, N*H*W x C
    assert inputs and all(t.dtype == torch.bfloat16 for t in inputs)
    assert out.dtype == out32.dtype == torch.bfloat16
    assert torch.equal(out, out32)
    out.backward(grad_out)
    out32.backward(grad_out)
    assert torch.equal(x.grad, x32.grad.bfloat16())
