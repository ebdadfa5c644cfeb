"""Layers fed by one tensor quantize it once, with results identical to quantizing it per layer."""

import copy

import pytest
import torch

import lowbit.nn.operand as operand
from lowbit import get_recipe
from lowbit.formats import Granularity, Rounding
from lowbit.nn import LowbitLinear
from lowbit.recipes import GemmSpec, LayerSpec, OperandSpec


def qkv(recipe: str, seed: int = 0) -> list[LowbitLinear]:
    torch.manual_seed(seed)
    spec = get_recipe(recipe).layer
    return [LowbitLinear(torch.nn.Linear(64, 32, bias=False), spec, seed=i) for i in range(3)]


def step(layers, inputs, grads):
    """Forward each layer on its input, backward the sum; outputs and all gradients."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    shared = len({id(x) for x in inputs}) == 1
    if shared:  # one leaf read by every layer, as a block's q, k and v projections read theirs
        inputs = [inputs[0]] * len(layers)
    outs = [layer(x) for layer, x in zip(layers, inputs)]
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    grads_x = [inputs[0].grad] if shared else [x.grad for x in inputs]
    return outs, sum(grads_x), [layer.weight.grad for layer in layers]


@pytest.mark.parametrize(
    "recipe", ["fp8-tensorwise", "fp8-delayed", "fp8-rowwise", "mxfp8", "fp8-blockwise"]
)
def test_shared_input_gives_the_same_bits_as_separate_inputs(recipe):
    x = torch.randn(4, 16, 64) * 3
    grads = [torch.randn(4, 16, 32) for _ in range(3)]
    layers = qkv(recipe)
    separate = step(copy.deepcopy(layers), [x.clone() for _ in range(3)], grads)
    shared = step(copy.deepcopy(layers), [x] * 3, grads)
    for a, b in zip(separate[0], shared[0]):
        assert torch.equal(a, b)
    assert torch.equal(separate[1], shared[1])
    for a, b in zip(separate[2], shared[2]):
        assert torch.equal(a, b)


def count_quantizations(monkeypatch) -> list:
    calls = []
    real = operand.quantize

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(operand, "quantize", counting)
    return calls


def test_three_layers_quantize_their_common_input_once(monkeypatch):
    calls = count_quantizations(monkeypatch)
    x = torch.randn(16, 64)
    for layer in qkv("mxfp8"):
        layer(x)
    assert calls.count((16, 64)) == 1  # the common input
    assert calls.count((32, 64)) == 3  # each layer's own weight


def test_delayed_layers_that_agree_on_the_amax_share_quantization_and_measurement(monkeypatch):
    calls = count_quantizations(monkeypatch)
    measured = []
    real_amax = operand.tensor_amax
    monkeypatch.setattr(
        operand, "tensor_amax", lambda x: measured.append(tuple(x.shape)) or real_amax(x)
    )
    layers = qkv("fp8-delayed")
    x = torch.randn(16, 64)
    for step_input in (x, x * 2):  # step 1: current amax; step 2: the (equal) histories' amax
        for layer in layers:
            layer(step_input)
        for layer in layers:
            layer.lowbit_state.commit()
    assert calls.count((16, 64)) == 2  # once per step, not per layer
    # step 1 measures the current amax once for the three layers (the weights, 32 x 64, measure
    # their own); step 2 scales by the history and takes the amax inside the shared quantization
    assert measured == [(16, 64)] + [(32, 64)] * 3
    histories = [layer.lowbit_state.histories["forward.x"] for layer in layers]
    for history in histories:
        assert history.filled == 2
        assert torch.equal(history.history[:2], torch.stack([2 * x.abs().max(), x.abs().max()]))


def test_a_delayed_layer_sharing_an_evaluating_layers_quantization_still_records_its_amax():
    a, b = qkv("fp8-delayed")[:2]
    x = torch.randn(16, 64)
    for layer in (a, b):  # one training step: both histories hold x's amax
        layer(x)
        layer.lowbit_state.commit()
    y = x * 3
    a.eval()  # a quantizes y with the history's scale and measures nothing (it records nothing)
    a(y)
    b(y)  # the same input, spec and scale: a's quantization, without a measured amax
    assert a.lowbit_state.histories["forward.x"].pending is None
    assert torch.equal(b.lowbit_state.histories["forward.x"].pending, y.abs().max())


def test_an_input_changed_in_place_is_quantized_again(monkeypatch):
    layers = qkv("fp8-tensorwise")
    x = torch.randn(64, 64)
    first = layers[0](x)
    x.mul_(2)  # same memory, new values: the version counter tells
    assert not torch.equal(layers[0](x), first)
    assert torch.equal(layers[0](x), layers[0](x.clone()))


def sr_layers(spec: LayerSpec, count: int = 2) -> list[LowbitLinear]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    return [LowbitLinear(copy.deepcopy(linear), spec) for _ in range(count)]


def test_layers_share_a_stochastic_rounding_and_a_layer_asking_again_draws_afresh():
    sr = OperandSpec("fp8_e4m3", Granularity.MX, rounding=Rounding.STOCHASTIC)
    nearest = OperandSpec("fp8_e4m3", Granularity.MX)
    spec = LayerSpec(forward=GemmSpec(sr, nearest))  # only the activation is rounded stochastically
    a, b = sr_layers(spec)
    x = torch.randn(16, 64)
    first = a(x)
    assert torch.equal(b(x), first)  # one draw for both readers, as a fused projection has
    again = a(x)  # a's second call: a fresh draw, not the one it had
    assert not torch.equal(again, first)
    assert not torch.equal(a(x), again)


def test_a_second_backward_through_one_graph_draws_its_stochastic_rounding_afresh():
    sr = OperandSpec("fp4_e2m1", Granularity.MX, rounding=Rounding.STOCHASTIC)
    bf16 = OperandSpec("bf16")
    spec = LayerSpec(forward=GemmSpec(bf16, bf16), grad_weight=GemmSpec(sr, sr))
    (layer,) = sr_layers(spec, 1)
    out = layer(torch.randn(16, 64))
    grad = torch.randn(16, 32)
    grads = []
    for _ in range(2):
        out.backward(grad, retain_graph=True)
        grads.append(layer.weight.grad.clone())
        layer.weight.grad = None
    assert not torch.equal(*grads)


def test_hadamard_layers_share_signs_and_so_their_input_quantization(monkeypatch):
    calls = count_quantizations(monkeypatch)
    layers = sr_layers(get_recipe("mxfp4").layer, 3)
    x = torch.randn(64, 64, requires_grad=True)
    sum((layer(x) * torch.randn(64, 32)).sum() for layer in layers).backward()
    # the weight gradient's x (64 tokens x 64 features, quantized along the tokens) once, not 3x;
    # grad_out along the tokens per layer (its own tensor), and no other 64 x 64 operand
    assert calls.count((64, 64)) == 1
    assert calls.count((32, 64)) == 3


def test_delayed_scaling_keeps_per_layer_histories():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    layers = [LowbitLinear(copy.deepcopy(linear), get_recipe("fp8-delayed").layer) for _ in "ab"]
    x = torch.randn(16, 64)
    for scale, layer in zip((1.0, 100.0), layers):  # the same weights, different histories
        layer(x * scale)
        layer.lowbit_state.commit()
    # layer b scales x by its history's 100x amax, so its values are coarser than layer a's
    assert not torch.equal(layers[0](x), layers[1](x))


def test_a_converted_llama_quantizes_a_shared_input_once_per_backward(monkeypatch):
    """`convert` gives every layer the same Hadamard signs, so in mxfp4's backward the q, k and v
    projections share the weight gradient's quantization of their common input, and so do gate
    and up."""
    import lowbit
    from lowbit.models import build_causal_lm

    model = build_causal_lm("tiny", 64, seed=0)
    precision = lowbit.Precision("mxfp4")
    precision.convert(model)
    with precision.autocast():
        loss = model(torch.randint(0, 64, (2, 8))).logits.float().logsumexp(-1).mean()
    calls = count_quantizations(monkeypatch)
    loss.backward()
    # per block and layer (7): grad_out along features and along tokens, the weight; the inputs
    # along the tokens once for q/k/v, o, gate/up and down: 4, not 7
    assert len(calls) == model.config.num_hidden_layers * (7 * 3 + 4)
