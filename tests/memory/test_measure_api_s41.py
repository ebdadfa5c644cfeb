"""Session 41: `measure_activations` measures the logits gradient without touching the model.

Its forward's loss was run backward up to the model's output layer (the loss backward's
transient); a forward returning the logits (no scalar) raised torch's "grad can be implicitly
created only for scalar outputs", a Hugging Face output object failed at ``loss.grad_fn``, and
with a frozen output layer the walk went into the model and ran a layer's backward, outside the
guard that keeps the fp8-delayed amax histories as they were."""

import copy

import torch
import torch.nn.functional as F

import lowbit
from lowbit.memory import measure_activations
from lowbit.models import build_causal_lm

VOCAB = 257


def histories(model) -> dict:
    """A copy of every converted layer's delayed-scaling amax histories."""
    return {
        f"{name}.{key}": copy.deepcopy(
            {k: v.clone() if torch.is_tensor(v) else v for k, v in vars(h).items()}
        )
        for name, module in model.named_modules()
        for key, h in getattr(getattr(module, "lowbit_state", None), "histories", {}).items()
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(x, y) if torch.is_tensor(x) else x == y
        for k in a
        for x, y in zip(a[k].values(), b[k].values(), strict=True)
    )


def test_a_frozen_output_layers_loss_is_measured_without_running_its_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 48)
    ).train()
    precision = lowbit.Precision("fp8-delayed")
    model = precision.convert(model)
    model[2].requires_grad_(False)
    x, y = torch.randn(16, 32), torch.randint(0, 48, (16,))

    def forward():
        with precision.autocast():
            return F.cross_entropy(model(x).float(), y)

    precision.backward(forward())  # a step's histories to keep
    model.zero_grad(set_to_none=True)
    before = histories(model)
    y = (y + 7) % 48  # other gradients than the step's: a backward run would record them
    saved = measure_activations(model, forward)
    assert saved.logits_gradient == 2 * 16 * 48 * 4  # the nll's and log-softmax's fp32 gradients
    # a loss scaled (as a step of --grad-accum 2 does) is the same loss backward
    assert measure_activations(model, lambda: forward() / 2).logits_gradient == 2 * 16 * 48 * 4
    assert same(before, histories(model))
    assert all(p.grad is None for p in model.parameters())


def test_a_forward_returning_logits_or_an_output_object_measures_no_logits_gradient():
    model = build_causal_lm("nano", VOCAB, seed=0)
    ids = torch.randint(0, VOCAB, (2, 8))
    for forward in (lambda: model(input_ids=ids).logits, lambda: model(input_ids=ids)):
        saved = measure_activations(model, forward)
        assert saved.logits_gradient == 0
        assert saved.activations > 0
    assert all(p.grad is None for p in model.parameters())
