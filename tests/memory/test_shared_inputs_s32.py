"""Session 32: the estimate keeps one quantized input (int8: one bf16 cast) for the layers that
read one tensor (a block's q, k and v; gate and up) where the run shares it
(`lowbit.nn.operand.SharedQuantization`), and one per layer where it does not (delayed scaling on
a GPU, ranks that agree on scales)."""

import torch
import torch.nn.functional as F

import lowbit
from lowbit.memory import measure_activations
from lowbit.memory.estimate import estimate
from lowbit.models import build_causal_lm
from lowbit.nn.operand import ScaleAgreement, set_scale_agreement
from lowbit.optim import build_optimizer
from lowbit.recipes import get_recipe

BATCH, SEQ = 4, 64


class _AgreeingRank(ScaleAgreement):
    """A rank of a job whose ranks agree on scales, alone: the max over one rank is its own
    amax, so it computes what a rank of identical ranks does, and shares what such a rank shares."""

    active = True


def _saved(recipe: str, agreeing: bool = False):
    """What the forward of `nano`'s second training step saves (`measure_activations`)."""
    precision = lowbit.Precision(get_recipe(recipe))
    model = precision.convert(build_causal_lm("nano", 257, seed=0))
    optimizer = precision.wrap_optimizer(
        build_optimizer(model.parameters(), lr=1e-3, state_precision="fp32")
    )
    windows = torch.randint(0, 257, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    x, y = windows[:, :-1], windows[:, 1:]

    def forward():
        with precision.autocast():
            return F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())

    previous = set_scale_agreement(_AgreeingRank() if agreeing else None)
    try:
        precision.backward(forward())
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return model.config, measure_activations(model, forward)
    finally:
        set_scale_agreement(previous)


def _shared_values(config) -> int:
    """Values of the inputs that k, v and up take from the layer before them (q's, k's, gate's)."""
    return BATCH * SEQ * config.num_hidden_layers * 3 * config.hidden_size


def test_fp8_tensorwise_estimate_keeps_one_quantized_input_per_tensor_as_the_run_does():
    """The estimate is the CPU measurement to the byte, less the CPU emulation's documented costs
    (docs/memory.md): a bf16 carrier (2 bytes) per quantized value where a GPU keeps 1, and a
    4-byte scale per quantized tensor; the quantized weights are temporary copies in both (the
    measurement's activations until session 38). It counted q's, k's and v's quantized input (and
    gate's and up's) once per layer: 294,912 bytes too many here, 589,824 at 8 x 128."""
    config, saved = _saved("fp8-tensorwise")
    planned = estimate("nano", "fp8-tensorwise", "fp32", BATCH, SEQ)
    layers, hidden, inner = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    # one quantized input each for q/k/v, o, gate/up and down (lm_head stays in bf16)
    inputs = BATCH * SEQ * layers * (3 * hidden + inner)
    weights = layers * (4 * hidden * hidden + 3 * hidden * inner)  # 7 layers' quantized weights
    input_scales, weight_scales = 4 * layers * 4, 4 * layers * 7
    # the head's bf16 copy, and the quantized weights
    assert planned.temporaries + weights + weight_scales == saved.temporaries
    assert planned.activations + inputs + input_scales == saved.activations


def test_delayed_scaling_is_estimated_per_layer_as_a_gpu_quantizes_it():
    """A delayed scale lives on the GPU, where `SharedQuantization` would have to read it back to
    compare it: each layer quantizes its own input. On a CPU the layers share it, so its CPU
    measurement is fp8-tensorwise's and the estimate (a GPU's) counts the shared inputs again."""
    config, delayed = _saved("fp8-delayed")
    _, tensorwise = _saved("fp8-tensorwise")
    assert delayed.activations == tensorwise.activations
    per_layer = estimate("nano", "fp8-delayed", "fp32", BATCH, SEQ).activations
    shared = estimate("nano", "fp8-tensorwise", "fp32", BATCH, SEQ).activations
    assert per_layer - shared == _shared_values(config)  # 1 byte each


def test_ranks_that_agree_on_scales_keep_one_int8_cast_per_layer():
    """Ranks that agree on scales share nothing (`SharedQuantization` keys on no agreed amax):
    over two GPUs every int8 layer keeps its own bf16 cast of its input (the estimate counted one
    per tensor, 294,912 bytes short here), and every fp8 layer its own quantized input."""
    config, saved = _saved("int8", agreeing=True)
    _, alone = _saved("int8")
    assert estimate("nano", "int8", "fp32", BATCH, SEQ, gpus=2).activations == saved.activations
    assert estimate("nano", "int8", "fp32", BATCH, SEQ).activations == alone.activations
    assert saved.activations - alone.activations == 2 * _shared_values(config)
    one, two = (
        estimate("nano", "fp8-tensorwise", "fp32", BATCH, SEQ, gpus=gpus).activations
        for gpus in (1, 2)
    )
    assert two - one == _shared_values(config)
