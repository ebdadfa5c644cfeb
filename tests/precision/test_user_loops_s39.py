"""Session 39: a user's loop that runs its converted model under ``torch.inference_mode()`` first
(an evaluation before training, a generation to check a resumed model) and then trains.

Tensors that lowbit makes once per device and keeps (the unit scale of an unscaled operand, a
delayed-scaling history moved to its layer's device) were made as inference tensors when first
needed inside ``torch.inference_mode()``, and the training that followed failed: "Inference tensors
cannot be saved for backward", or "Inplace update to inference tensor outside InferenceMode" at the
step. The CPU's unit scale is made at import, so a CPU loop met this only on a device whose tensors
are made at first use (a GPU); the first test stands for that device by starting from no unit
scale."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.errors import UsageError
from lowbit.formats import qtensor


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def _batches(device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 16, generator=generator).to(device), torch.randint(0, 4, (8,)).to(device))
        for _ in range(3)
    ]


def _train(precision, model, optimizer, batches) -> None:
    for x, y in batches:
        with precision.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()


def _evaluate(precision, model, x) -> torch.Tensor:
    model.eval()
    with torch.inference_mode(), precision.autocast():
        out = model(x)
    model.train()
    return out


@pytest.mark.parametrize("recipe", ["fp16-mixed", "fp16-low"])
def test_training_after_a_first_forward_under_inference_mode(recipe, monkeypatch):
    """fp16 emulated on the CPU saves its plain-cast operands, unit scale included, for the
    backward; with the unit scale first made under inference mode the first backward failed."""
    runs = []
    for evaluate_first in (False, True):
        monkeypatch.setattr(qtensor, "_UNIT_SCALES", {})  # a device whose scale is not made yet
        precision = lowbit.Precision(recipe)
        model = precision.convert(_model())
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
        batches = _batches()
        if evaluate_first:
            _evaluate(precision, model, batches[0][0])
        _train(precision, model, optimizer, batches)
        runs.append([p.detach().clone() for p in model.parameters()])
    for trained, evaluated_first in zip(*runs):
        assert torch.equal(trained, evaluated_first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_resumed_delayed_scaling_run_evaluated_first_under_inference_mode_trains():
    """fp8-delayed's histories, loaded on the CPU, move to the GPU at the first forward: under
    inference mode they became inference tensors, and the next step's commit failed."""
    precision = lowbit.Precision("fp8-delayed")
    model = precision.convert(_model().cuda())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    batches = _batches("cuda")
    _train(precision, model, optimizer, batches)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "precision": precision.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, map_location="cpu")  # a checkpoint read on the CPU
    resumed = lowbit.Precision("fp8-delayed")
    model = resumed.convert(_model().cuda())
    model.load_state_dict(checkpoint["model"])
    optimizer = resumed.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    resumed.load_state_dict(checkpoint["precision"])
    _evaluate(resumed, model, batches[0][0])
    _train(resumed, model, optimizer, batches)  # failed at the step


def test_weights_beyond_fp16_loaded_into_a_model_converted_on_meta_are_refused_at_wrapping():
    """`convert` refuses a weight beyond fp16's 65504 under fp16-low, but a model converted on the
    meta device has no values then: loaded after ``to_empty``, the weight became inf, and every
    step was skipped as an overflow (``precision.step`` returned False) without a word."""
    pretrained = _model()
    with torch.no_grad():
        pretrained[2].weight[0, 0] = 1e5
    precision = lowbit.Precision("fp16-low")
    with torch.device("meta"):
        model = _model()
    model = precision.convert(model)
    model.to_empty(device="cpu")
    model.load_state_dict(pretrained.state_dict())
    with pytest.raises(UsageError) as refused:
        precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    message = str(refused.value)
    assert "2.weight holds inf" in message and "65504" in message and "\n" not in message
    assert "load the weights before precision.convert()" in message
    assert precision.state_dict()["params_per_optimizer"] == []  # nothing wrapped


def test_the_inf_check_at_wrapping_takes_a_model_over_devices():
    """A model placed over devices (a ``device_map``) was refused by the check itself, which
    stacked one flag per parameter into one tensor: "Tensor on device meta is not on the expected
    device cpu". Each device is checked on its own; a layer left on meta holds no values, and an
    inf on another device is still refused."""
    precision = lowbit.Precision("fp16-low")
    model = precision.convert(_model())
    model[0].to("meta")
    precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))

    precision = lowbit.Precision("fp16-low")
    model = precision.convert(_model())
    model[0].to("meta")
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(UsageError, match=r"2\.weight holds inf"):
        precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
