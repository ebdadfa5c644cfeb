"""int8's lean layer path (`lowbit.nn.linear._lean`) against the general path, bit for bit."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import get_recipe
from lowbit.models import build_causal_lm
from lowbit.nn import LowbitLinear
from lowbit.nn.linear import LowbitLinearFunction, LowbitModule


def general_path_only(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, LowbitModule):
            module.lowbit_state.lean_quantizers = None
    return model


def forward_backward(layer, x, grad, autocast: bool):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    out.backward(grad.to(out.dtype))
    return [out.detach(), x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_layer_computes_the_general_paths_bits(bias, dtype, autocast):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=bias).to(dtype)
    lean = LowbitLinear(copy.deepcopy(linear), get_recipe("int8").layer)
    general = general_path_only(LowbitLinear(copy.deepcopy(linear), get_recipe("int8").layer))
    assert lean.lowbit_state.lean_quantizers is not None
    x, grad = torch.randn(3, 17, 48).to(dtype), torch.randn(3, 17, 40)
    for ours, theirs in zip(
        forward_backward(lean, x, grad, autocast),
        forward_backward(general, x, grad, autocast),
        strict=True,
    ):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def lean_and_general(in_features: int, out_features: int, bias: bool = True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    lean = LowbitLinear(copy.deepcopy(linear), get_recipe("int8").layer)
    return lean, general_path_only(LowbitLinear(linear, get_recipe("int8").layer))


def assert_same_bits(ours: list, theirs: list) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))


@pytest.mark.parametrize("shape", [(1, 6), (6, 1), (1, 1)])
def test_lean_layer_of_one_feature(shape):
    """One input feature (K = 1, where the int8 GEMM is padded) or one output feature."""
    lean, general = lean_and_general(*shape)
    x, grad = torch.randn(5, shape[0]), torch.randn(5, shape[1])
    for autocast in (False, True):
        assert_same_bits(
            forward_backward(lean, x, grad, autocast), forward_backward(general, x, grad, autocast)
        )


def test_lean_layer_rounds_outputs_as_the_general_path():
    """fp16 emulation's output rounding (`LayerState.output_rounding`), with and without bias."""
    for bias in (False, True):
        lean, general = lean_and_general(24, 12, bias)
        for layer in (lean, general):
            layer.lowbit_state.output_rounding = torch.float16
        x, grad = torch.randn(7, 24) * 1e5, torch.randn(7, 12)  # some outputs beyond fp16's range
        ours = forward_backward(lean, x, grad, autocast=False)
        assert torch.isinf(ours[0]).any()
        assert_same_bits(ours, forward_backward(general, x, grad, autocast=False))


def test_lean_backward_of_frozen_parts_inside_autocast_and_exact():
    """Only the gradients asked for (a frozen weight or bias, an input without grad), a backward
    run inside an autocast region, and one within `exact_accumulation` (fp32 GEMM outputs)."""
    from lowbit.nn.gemm import exact_accumulation

    x, grad = torch.randn(9, 16), torch.randn(9, 8)

    def run(layer, frozen: str, in_autocast: bool, exact: bool):
        for name, parameter in layer.named_parameters():
            parameter.grad = None
            parameter.requires_grad_(name != frozen)
        given = x.clone().requires_grad_(frozen != "input")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(given)
            if not in_autocast:
                out = out.float()
        with (
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=in_autocast),
            exact_accumulation() if exact else contextlib.nullcontext(),
        ):
            out.backward(grad.to(out.dtype))
        return [given.grad, *(p.grad for p in layer.parameters())]

    lean, general = lean_and_general(16, 8)
    for frozen in ("weight", "bias", "input"):
        for in_autocast in (False, True):
            for exact in (False, True):
                ours = run(lean, frozen, in_autocast, exact)
                assert_same_bits(ours, run(general, frozen, in_autocast, exact))
                assert sum(g is None for g in ours) == 1


def test_int8_layers_take_the_lean_path_unless_observed(monkeypatch):
    layer = LowbitLinear(torch.nn.Linear(16, 8), get_recipe("int8").layer)
    x, grad = torch.randn(4, 16), torch.randn(4, 8)
    reference = forward_backward(layer, x, grad, autocast=True)

    def refused(*args, **kwargs):
        raise AssertionError("took the general path")

    monkeypatch.setattr(LowbitLinearFunction, "_forward", staticmethod(refused))
    for ours, theirs in zip(forward_backward(layer, x, grad, True), reference, strict=True):
        assert torch.equal(ours, theirs)
    layer.lowbit_state.observer = lambda *args: None  # diagnostics read the quantized operands
    with pytest.raises(AssertionError, match="general path"):
        forward_backward(layer, x, grad, autocast=True)


def test_lean_training_matches_the_general_path():
    """A tiny Llama's q, k and v projections share one quantization of their input on both paths;
    three AdamW steps give the same losses and weights."""

    def train(lean: bool):
        precision = lowbit.Precision("int8")
        model = precision.convert(build_causal_lm("tiny", 257, seed=0))
        if not lean:
            general_path_only(model)
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        tokens = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(3):
            with precision.autocast():
                logits = model(tokens[:, :-1]).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            precision.backward(loss)
            precision.step(optimizer)
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    (lean_losses, lean_weights), (losses, weights) = train(True), train(False)
    assert lean_losses == losses
    assert all(torch.equal(a, b) for a, b in zip(lean_weights, weights, strict=True))
