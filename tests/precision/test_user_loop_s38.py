"""Session 38: a user's own loop clipping its gradients with PyTorch's tools under loss scaling.

``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`` between ``precision.backward`` and
``precision.step`` (a loop written for bf16-mixed) clips the loss-scaled gradients under fp16
recipes: the norm is the scale (65536) times too large, and the step that much too small, without
a word. GradScaler's loop calls ``unscale_`` first; `Precision.unscale_` is that call, and a loop
that skips it is warned of once."""

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.errors import UsageError
from lowbit.recipes import LossScaling
from tests.distributed.helpers import on_ranks

# fp32 parameters under dynamic loss scaling: the arithmetic of GradScaler's fp32 loop, bit for bit
SCALED_FP32 = replace(
    lowbit.get_recipe("fp32"),
    name="fp32-loss-scaled",
    loss_scaling=LossScaling.DYNAMIC,
    initial_loss_scale=2.0**16,
    loss_scale_growth_interval=2,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def _groups(model: nn.Module) -> list[dict]:
    """Param groups of their own learning rates and weight decays, for SGD with momentum (whose
    step scales with the gradient: Adam's normalizes a clipping of the scaled gradients away, all
    but its eps)."""
    return [
        {"params": list(model[0].parameters()), "lr": 0.05, "weight_decay": 0.1},
        {"params": list(model[2].parameters()), "lr": 0.01, "weight_decay": 0.0},
    ]


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(_groups(model), momentum=0.9)


def _batches(steps: int, accumulate: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(1)
    return [
        [
            (
                torch.randn(8, 16, generator=generator),
                torch.randint(0, 4, (8,), generator=generator),
            )
            for _ in range(accumulate)
        ]
        for _ in range(steps)
    ]


def _grad_scaler_loop(batches) -> tuple[nn.Module, list[float]]:
    """PyTorch's recipe: accumulate scaled gradients, ``unscale_``, clip, step, update."""
    model = _model()
    optimizer = _optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    scales = []
    for micro in batches:
        for x, y in micro:
            scaler.scale(F.cross_entropy(model(x), y) / len(micro)).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in _groups(model) for p in g["params"]], 0.5)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=False)
        scales.append(scaler.get_scale())
    return model, scales


def _precision_loop(recipe, batches, clip) -> tuple[nn.Module, list[float], list]:
    """The same loop through `Precision`; ``clip(precision, model, optimizer)`` clips. Returns the
    model, the loss scales and the warnings lowbit gave."""
    precision = lowbit.Precision(recipe)
    model = precision.convert(_model())
    optimizer = precision.wrap_optimizer(_optimizer(model))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    scales = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for micro in batches:
            for x, y in micro:
                with precision.autocast():
                    loss = F.cross_entropy(model(x.to(precision.compute_dtype)).float(), y)
                precision.backward(loss / len(micro))
            clip(precision, model, optimizer)
            precision.step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=False)
            scales.append(precision.loss_scale)
    return model, scales, [w for w in caught if str(w.message).startswith("lowbit")]


def _unscale_then_clip(precision, model, optimizer):
    torch.nn.utils.clip_grad_norm_(precision.unscale_(optimizer), 0.5)


def _clip_scaled(precision, model, optimizer):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)


def _mask_one_gradient(precision, model, optimizer):
    model[0].weight.grad[:4] = 0  # linear in the gradients: right under any scale
    precision.clip_grad_norm_(optimizer, 0.5)


def test_unscale_then_clip_is_grad_scalers_loop_and_clipping_scaled_gradients_is_warned_of():
    batches = _batches(steps=5, accumulate=2)
    reference, reference_scales = _grad_scaler_loop(batches)
    ours, scales, caught = _precision_loop(SCALED_FP32, batches, _unscale_then_clip)
    assert scales == reference_scales and scales[-1] > 2.0**16  # the scale grew on the way
    assert all(map(torch.equal, ours.parameters(), reference.parameters()))
    assert not caught
    assert not _precision_loop(SCALED_FP32, batches, _mask_one_gradient)[2]
    # clipped while scaled: the weights hardly move, and lowbit says so, once, at the user's step
    wrong, _, caught = _precision_loop(SCALED_FP32, batches, _clip_scaled)
    start = _model()[2].weight  # the group without weight decay: moved by its gradients alone
    moved = (wrong[2].weight - start).abs().amax()
    assert moved < (reference[2].weight - start).abs().amax() / 1000
    assert len(caught) == 1 and caught[0].filename == __file__
    message = str(caught[0].message)
    assert "loss scale (now 65536)" in message and "precision.clip_grad_norm_(optimizer" in message


@pytest.mark.parametrize("recipe", ["fp16-mixed", "fp16-low"])
def test_clipping_the_fp16_recipes_scaled_gradients_is_warned_of_once(recipe):
    batches = _batches(steps=3, accumulate=2)
    assert len(_precision_loop(recipe, batches, _clip_scaled)[2]) == 1
    assert not _precision_loop(recipe, batches, _unscale_then_clip)[2]
    assert not _precision_loop(recipe, batches, _mask_one_gradient)[2]


def test_the_report_kept_in_place_of_the_model_names_the_fix():
    """``model = lowbit.convert(model, recipe)`` keeps `lowbit.convert`'s report, not the model
    (converted in place): the next ``model.parameters()`` failed with "object has no attribute"
    alone, and ``precision.convert(model)`` said "pass the model itself"."""
    model = _model()
    model = lowbit.convert(model, "fp8-tensorwise")
    with pytest.raises(AttributeError, match=r"converts the model in place .* fix: call lowbit"):
        torch.optim.SGD(model.parameters(), lr=0.1)
    assert not hasattr(model, "parameters") and model.summary() == "converted 2/2 layers"
    with pytest.raises(UsageError, match="got a ConversionReport, which lowbit"):
        lowbit.Precision("fp8-tensorwise").convert(model)


@pytest.mark.parametrize("recipe", ["fp32", "fp16-mixed", "bf16-low"])
def test_autocast_decorates_a_forward_under_every_recipe(recipe):
    """``torch.autocast`` decorates as well as it enters; the no-op context of a recipe without
    autocast (fp32, fp16 emulated on a CPU, 16-bit parameters) failed as a decorator with
    "'nullcontext' object is not callable", under one recipe and not another."""
    precision = lowbit.Precision(recipe)
    model = precision.convert(_model())
    x = torch.randn(8, 16).to(precision.compute_dtype)

    @precision.autocast()
    def forward(x):
        return model(x)

    with precision.autocast():
        expected = model(x)
    assert torch.equal(forward(x), expected) and expected.dtype == precision.compute_dtype


def _clip_measured(precision, model, optimizer):
    torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # measures, changes nothing


def test_an_optimizer_not_wrapped_is_warned_of_from_its_second_step():
    """fp16-mixed steps an optimizer never given to `wrap_optimizer` (fp32 parameters) as plain
    PyTorch does; `backward` marked only wrapped ones, and clipping its scaled gradients was never
    warned of. Now it is known from its first step, and warned of at the second."""
    precision = lowbit.Precision("fp16-mixed")
    model = precision.convert(_model())
    optimizer = _optimizer(model)
    steps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, micro in enumerate(_batches(steps=3, accumulate=1)):
            x, y, seen = *micro[0], len(caught)
            with precision.autocast():
                loss = F.cross_entropy(model(x.to(precision.compute_dtype)).float(), y)
            precision.backward(loss)
            _clip_scaled(precision, model, optimizer)
            precision.step(optimizer)
            optimizer.zero_grad()
            steps += [step for w in caught[seen:] if "changed in place" in str(w.message)]
    assert steps == [1]


def test_a_measured_norm_is_warned_of_as_measured_or_clipped():
    """``clip_grad_norm_(params, inf)`` only measures the norm (no value changes) and was warned
    of as "an SGD step that much too small"; the norm it returned is what is wrong."""
    caught = _precision_loop("fp16-mixed", _batches(steps=2, accumulate=1), _clip_measured)[2]
    assert len(caught) == 1 and "measured or clipped then" in str(caught[0].message)


def _data_parallel_loops(rank, world) -> dict[str, int]:
    """``strategy/clip -> the warnings`` of 2 steps of fp16-mixed (2 micro-batches each) on this
    rank, for DDP (its gradients their own tensors, or views of its buckets) and FSDP2."""
    from torch.nn.parallel import DistributedDataParallel

    from lowbit.distributed import Ranks

    def mask(precision, model, optimizer):  # 4 columns of one gradient: right as it is
        next(model.parameters()).grad[:, :4].zero_()
        precision.clip_grad_norm_(optimizer, 0.5)

    clips = {"scaled": _clip_scaled, "mask": mask, "unscaled": _unscale_then_clip}
    found = {}
    for strategy in ("ddp", "ddp-bucket-view", "fsdp"):
        ranks = Ranks("fsdp" if strategy == "fsdp" else "ddp", torch.device("cpu"))
        for name, clip in clips.items():
            precision = lowbit.Precision("fp16-mixed")
            model = precision.convert(_model())
            if strategy == "fsdp":
                _, train = ranks.wrap(model, precision)
            else:
                train = DistributedDataParallel(
                    model, gradient_as_bucket_view=strategy == "ddp-bucket-view"
                )
            optimizer = precision.wrap_optimizer(_optimizer(model))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for micro in _batches(steps=2, accumulate=2):
                    for i, (x, y) in enumerate(micro):
                        with ranks.accumulating(train, more=i < len(micro) - 1):
                            with precision.autocast():
                                out = train(x.to(precision.compute_dtype)).float()
                            precision.backward(F.cross_entropy(out, y) / len(micro))
                    clip(precision, model, optimizer)
                    precision.step(optimizer)
                    optimizer.zero_grad()
            found[f"{strategy}/{name}"] = sum("changed in place" in str(w.message) for w in caught)
    return found


def test_clipping_scaled_gradients_is_warned_of_under_ddp_and_fsdp2_and_a_mask_is_not():
    """DDP's ``gradient_as_bucket_view=True`` makes each gradient a view of its bucket, sharing
    its version counter: a mask on one gradient moved both ends' and was warned of. FSDP2's
    DTensor gradients move no version counter: a clipping of the scaled gradients was not."""
    for found in on_ranks(_data_parallel_loops, 2, timeout=240):
        assert found == {
            f"{strategy}/{name}": int(name == "scaled")
            for strategy in ("ddp", "ddp-bucket-view", "fsdp")
            for name in ("scaled", "mask", "unscaled")
        }


class _SlottedSGD:
    """A duck-typed optimizer with ``__slots__`` and no ``__weakref__``: no weak reference to it
    can be made."""

    __slots__ = ("param_groups", "state")

    def __init__(self, params, lr: float):
        self.param_groups = [{"params": list(params), "lr": lr}]
        self.state = {}

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])

    def zero_grad(self, set_to_none: bool = True):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


class _WeakSGD(_SlottedSGD):
    """The same optimizer, weakly referable (a subclass without ``__slots__``)."""


def test_an_optimizer_with_slots_and_no_weakref_steps_under_loss_scaling():
    """fp16-mixed keeps a weak reference to an optimizer not given to `wrap_optimizer`: one whose
    class has ``__slots__`` without ``__weakref__`` failed its first step with "cannot create
    weak reference to '_SlottedSGD' object". It steps as a weakly referable one does."""
    models = []
    for kind in (_SlottedSGD, _WeakSGD):
        precision = lowbit.Precision("fp16-mixed")
        model = precision.convert(_model())
        optimizer = kind(model.parameters(), lr=0.1)
        for micro in _batches(steps=3, accumulate=1):
            x, y = micro[0]
            with precision.autocast():
                loss = F.cross_entropy(model(x.to(precision.compute_dtype)).float(), y)
            precision.backward(loss)
            precision.step(optimizer)
            optimizer.zero_grad()
        models.append(model)
    assert all(map(torch.equal, models[0].parameters(), models[1].parameters()))
    assert not torch.equal(models[0][0].weight, _model()[0].weight)
