"""Loss scaling against torch.amp.GradScaler at its edges, and 16-bit write-back past fp16's range."""

import warnings
from dataclasses import replace

import pytest
import torch

from lowbit import Precision, get_recipe
from lowbit.errors import UsageError
from lowbit.precision.scaler import LossScaler


class Weights(torch.nn.Module):
    """Elementwise parameters only: no GEMM is converted, so fp16-mixed's gradients are exactly a
    plain fp32 loop's and the comparison with GradScaler is bit for bit. ``c`` gets no gradient
    (None) and ``frozen`` does not train."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(8, generator=gen))
        self.b = torch.nn.Parameter(torch.randn(8, generator=gen))
        self.c = torch.nn.Parameter(torch.randn(8, generator=gen))
        self.frozen = torch.nn.Parameter(torch.randn(8, generator=gen), requires_grad=False)

    def forward(self, x):
        return (self.a * x).sum() ** 2 + (self.b * x * self.frozen).sum()


def groups(model):
    return [{"params": [model.a, model.frozen]}, {"params": [model.b, model.c], "lr": 0.05}]


def side_by_side(steps, inject, growth_interval=2, accumulate=1, clip=None):
    """fp16-mixed through `Precision` and the GradScaler recipe on one model: the loss scales and
    whether the two models stayed equal, per step, the precision and both models. ``inject``:
    step -> a value put into a gradient after the backward."""
    recipe = replace(get_recipe("fp16-mixed"), loss_scale_growth_interval=growth_interval)
    ours, theirs = Weights(), Weights()
    precision = Precision(recipe)
    precision.convert(ours)
    opt = precision.wrap_optimizer(torch.optim.SGD(groups(ours), lr=0.1, momentum=0.9))
    ref_opt = torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
    gen = torch.Generator().manual_seed(1)
    scales, ref_scales, equal = [], [], []
    for step in range(steps):
        for _ in range(accumulate):
            x = torch.randn(8, generator=gen)
            precision.backward(ours(x) / accumulate)
            scaler.scale(theirs(x) / accumulate).backward()
        if step in inject:
            ours.a.grad[0] = theirs.a.grad[0] = inject[step]
        if clip is not None:
            norm = precision.clip_grad_norm_(opt, clip)
            scaler.unscale_(ref_opt)
            ref_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), clip)
            assert torch.equal(norm, ref_norm) or (norm.isnan() and ref_norm.isnan())
        precision.step(opt)
        scaler.step(ref_opt)
        scaler.update()
        opt.zero_grad()
        ref_opt.zero_grad()
        scales.append(precision.loss_scale)
        ref_scales.append(scaler.get_scale())
        equal.append(all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters())))
    return scales, ref_scales, equal, precision, (ours, theirs)


def test_scale_trajectory_with_injected_overflows_is_grad_scalers():
    inf, nan = float("inf"), float("nan")
    inject = {2: inf, 5: nan, 6: -inf, 13: nan}
    scales, ref_scales, equal, precision, _ = side_by_side(20, inject, accumulate=2, clip=0.5)
    assert scales == ref_scales and all(equal)
    assert precision.skipped_steps == len(inject)
    # growth after exactly growth_interval finite steps, halving at each overflow
    assert scales[:8] == [2.0**16, 2.0**17, 2.0**16, 2.0**16, 2.0**17, 2.0**16, 2.0**15, 2.0**15]


def test_growth_interval_1_doubles_every_step_and_stops_short_of_inf_as_grad_scaler():
    scales, ref_scales, *_ = side_by_side(140, {}, growth_interval=1)
    assert scales == ref_scales
    assert scales[:3] == [2.0**17, 2.0**18, 2.0**19]
    # doubled until the scaled gradients overflow fp32, then backed off: never inf
    assert max(scales) < float("inf") and min(scales[100:]) < max(scales)


def test_persistent_overflows_hold_the_scale_at_a_floor_and_the_weights_finite():
    """GradScaler's scale has no floor: 165 overflows in a row from 2^16 take it to 0, whose
    reciprocal is inf, and the next finite step wrote NaN into the weights (PyTorch's unscale checks
    the gradients before it multiplies them). Precision's stops at 2^-126, fp32's smallest normal,
    and grows back once the gradients are finite."""
    inject = dict.fromkeys(range(170), float("nan"))
    with pytest.warns(UserWarning, match=r"loss scale fell to its floor .*every step is skipped"):
        scales, ref_scales, equal, precision, (ours, theirs) = side_by_side(176, inject)
    floor = 2.0**-126
    assert scales[:142] == ref_scales[:142] and scales[141] == floor
    assert scales[142:170] == [floor] * 28 and ref_scales[165] == 0.0
    assert scales[170:] == [floor, 2 * floor, 2 * floor, 4 * floor, 4 * floor, 8 * floor]
    assert precision.skipped_steps == 170 and all(equal[:170])
    assert all(p.isfinite().all() for p in ours.parameters())
    assert theirs.a.isnan().all()


def write_back_run(recipe, steps=3):
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([60000.0, -60000.0, 1.0]))
    precision = Precision(recipe)
    precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=20000.0))
    for _ in range(steps):
        # gradient (-0.5, 0.5, 0): small enough to pass the loss scale, the update 10000
        precision.backward((model.w.float() * torch.tensor([-0.5, 0.5, 0.0])).sum())
        assert precision.step(optimizer)
        optimizer.zero_grad()
    return model, precision


@pytest.mark.parametrize(
    "recipe",
    [
        "fp16-low",
        replace(get_recipe("fp16-low"), master_dtype=None, update_rounding="kahan"),
        replace(get_recipe("fp16-low"), master_dtype=None, update_rounding="stochastic"),
    ],
    ids=["master", "kahan", "stochastic"],
)
def test_an_update_past_fp16s_largest_value_is_held_there_with_a_warning(recipe):
    """Rounded to fp16 the parameter became inf, every later loss NaN, and the loss scale skipped
    every step after, silently."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # said once however often the filter would repeat it
        model, precision = write_back_run(recipe)
    held = [w for w in caught if "past fp16's largest value, 65504" in str(w.message)]
    assert len(held) == 1 and "fix: a lower" in str(held[0].message)
    assert model.w.dtype == torch.float16
    assert model.w.tolist() == [65504.0, -65504.0, 1.0]
    for part in (precision.update.masters, precision.update.compensation):
        for value in part.values():  # master held too; Kahan kept nothing past the range
            assert value.isfinite().all() and value.abs().max() <= 65504.0


def test_bf16_low_updates_past_65504_are_not_held():
    model, _ = write_back_run("bf16-low", steps=1)
    assert model.w.float()[0] > 65504.0


def test_a_loss_scale_whose_reciprocal_is_inf_is_refused_in_one_line(tmp_path, capsys):
    """A subnormal ``--loss-scale`` passed the recipe's check (positive, finite), and the first
    step unscaled by inf: the weights became inf, the step reported as taken."""
    from lowbit.cli import main

    out = tmp_path / "run"
    flags = ["--recipe", "fp16-mixed", "--loss-scale", "1e-39", "--steps", "1", "--quiet"]
    assert main(["train", *flags, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "2^-126" in error and "fix: e.g. 65536" in error
    assert not out.exists()
    for kind in ("static", "dynamic"):  # the scaler made directly refuses it too
        with pytest.raises(UsageError, match="loss scale 1e-39 is below"):
            LossScaler(dynamic=kind == "dynamic", init_scale=1e-39)


def test_a_recipe_with_a_subnormal_loss_scale_is_refused_where_it_is_made():
    """`lowbit compare` builds every recipe before its first run: a scale whose reciprocal is inf
    was refused only when the study reached its first fp16 run, after the baseline had trained."""
    with pytest.raises(UsageError, match=r"2\^-126"):
        replace(get_recipe("fp16-mixed"), initial_loss_scale=1e-39)


class _InfGradient(torch.autograd.Function):
    """The identity whose backward is inf: a finite loss whose gradients overflow at any scale."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_a_run_whose_every_step_overflows_stops_at_the_scale_floor(tmp_path, monkeypatch):
    """Gradients that overflow at every step skipped every step under fp16 loss scaling, the
    scale halving each time: the run went on to its last step having trained nothing (now the
    scale stops at its floor, and the trainer stops there). The loss stays finite: a non-finite
    one stops the run after 8 in a row (tests/train/test_diverged_s43.py), long before."""
    from lowbit.train import NonFiniteLoss, TrainConfig, train
    from lowbit.train import trainer as trainer_module
    from tests.train.conftest import TINY

    original_init = trainer_module.Trainer.__init__

    def init(self, *args, **kw):
        original_init(self, *args, **kw)
        loss = self.task.loss

        def overflowing(model, batch):  # steps 3 on
            value, count = loss(model, batch)
            return (_InfGradient.apply(value) if self.step_idx >= 2 else value), count

        self.task.loss = overflowing

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)
    settings = {**TINY["image-classification"], "task": "image-classification"}
    settings |= {"steps": 400, "eval_interval": 1000, "save_interval": 1000}
    config = TrainConfig(**settings, recipe="fp16-mixed", out=str(tmp_path / "run"))
    with pytest.raises(NonFiniteLoss, match="overflowed at the smallest loss scale") as error:
        train(config, quiet=True)
    # 2^16 halves to 2^-126 in 142 overflows, from step 3 on: steps 3..144
    assert "step 144 overflowed" in str(error.value)
