"""The `auto` recipe: plans from measured error, moves up and down, survives checkpoints, and
retries non-finite steps in higher precision."""

import json
import math

import torch

import lowbit
from lowbit.diagnostics.auto import AutoPrecision, plan_over_time
from lowbit.diagnostics.stats import OPERANDS
from lowbit.recipes.auto import operand_spec
from lowbit.train import evaluate_run, train
from lowbit.train.trainer import Trainer


def _observed_step(controller, model, x, step):
    """One checked step. ``forward``, not ``__call__``: the toy model's first layer stands for a
    layer inside a network; one that reads the model's input stays bf16 (tested below)."""
    controller.begin()
    model.forward(x).square().mean().backward()
    return controller.finish_check(step)


def test_auto_moves_an_outlier_input_up_and_back_down_when_stable():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32))
    lowbit.convert(model, "auto")
    controller = AutoPrecision(model, "fp8", patience=2)
    x = torch.randn(256, 128, requires_grad=True)
    _observed_step(controller, model, x, 1)
    assert controller.plan["0"]["forward.x"] == "fp8"  # e4m3 on N(0,1): ~31 dB, passes
    assert controller.summary()["frac_8bit_or_below"] == 1.0

    outliers = x.detach().clone()
    outliers[:, :2] *= 2.0**17  # two channels 1e5 x the rest: the rest flushes in e4m3
    _, changes = _observed_step(controller, model, outliers.requires_grad_(), 25)
    assert controller.plan["0"]["forward.x"] == "bf16"  # block scaling along K fails too
    moved = [c for c in changes if c["layer"] == "0" and c["operand"] == "forward.x"]
    assert moved and moved[0]["why"] in ("underflow", "low SQNR")
    assert model[0].lowbit_state.spec.forward.a.format == "bf16"  # the layer follows the plan

    _observed_step(controller, model, x, 50)  # one stable check is not enough
    assert controller.plan["0"]["forward.x"] == "bf16"
    _observed_step(controller, model, x, 75)
    assert controller.plan["0"]["forward.x"] == "fp8"
    assert model[0].lowbit_state.spec.forward.a.format == "fp8_e4m3"


def test_auto_leaves_overridden_layers_as_the_override_says():
    """``auto`` with ``--override``: the layers an override converted keep its spec through the
    checks (an fp32 layer stays fp32, an fp8 one is observed but not moved); the rest follow
    the plan."""
    from lowbit.recipes import parse_override

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(3)))
    recipe = lowbit.get_recipe("auto")
    recipe = recipe.with_overrides(
        parse_override("0=fp32", recipe), parse_override("1=fp8-tensorwise", recipe)
    )
    lowbit.convert(model, recipe)
    pinned = {name: model[int(name)].lowbit_state.spec for name in ("0", "1")}
    controller = AutoPrecision(model, "fp8")
    assert set(controller.plan) == {"2"}
    x = torch.randn(256, 64, requires_grad=True)
    _observed_step(controller, model, x, 1)
    outliers = x.detach().clone()
    outliers[:, :2] *= 2.0**17
    _observed_step(controller, model, outliers.requires_grad_(), 25)
    assert {name: model[int(name)].lowbit_state.spec for name in ("0", "1")} == pinned
    assert model[2].lowbit_state.spec.forward.a.format == "fp8_e4m3"  # controlled: moved down


def test_layers_that_read_the_raw_input_stay_in_bf16():
    """A CNN's first convolution reads the pixels (17 levels that e4m3 distorts): it stays bf16
    while the next one moves down; a layer reading an embedding, not the token ids, is not one."""
    from lowbit.models import build_cnn

    cnn = build_cnn("tiny")
    lowbit.convert(cnn, "auto")
    controller = AutoPrecision(cnn, "fp8")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 17, (32, 1, 8, 8), generator=gen).float() / 16
    controller.begin()
    torch.nn.functional.cross_entropy(cnn(images), torch.arange(32) % 10).backward()
    controller.finish_check(1)
    assert controller.input_layers == {"features.0"}
    assert set(controller.plan["features.0"].values()) == {"bf16"}
    assert cnn.features[0].lowbit_state.spec.forward.a.format == "bf16"
    assert "fp8" in controller.plan["features.2"].values()
    assert AutoPrecision(cnn, "fp8").state_dict()["input_layers"] == []
    restored = AutoPrecision(cnn, "fp8")
    restored.load_state_dict(controller.state_dict())
    assert restored.input_layers == {"features.0"}

    class Embedded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 64)
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, ids):
            return self.proj(self.embed(ids))

    model = Embedded()
    lowbit.convert(model, "auto")
    controller = AutoPrecision(model, "fp8")
    controller.begin()
    model(torch.randint(0, 16, (128,))).square().mean().backward()
    controller.finish_check(1)
    assert controller.input_layers == set() and "fp8" in controller.plan["proj"].values()

    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32))  # reads a view
    lowbit.convert(mlp, "auto")
    controller = AutoPrecision(mlp, "fp8")
    controller.begin()
    mlp(images).square().mean().backward()
    controller.finish_check(1)
    assert controller.input_layers == {"1"}


def test_auto_budget_fp4_puts_well_scaled_operands_in_fp4_and_wide_ones_higher():
    """MX e2m1 gives ~18.8 dB and clips ~2% of a normal block by design: operands doing that
    well are fp4 under ``auto:fp4`` (they failed the absolute 24 dB and 1e-4 limits, so fp4 was
    never chosen); a weight spread over many binades within each block is moved up."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    lowbit.convert(model, "auto:fp4")
    controller = AutoPrecision(model, "fp4")
    _observed_step(controller, model, torch.randn(256, 128, requires_grad=True), 1)
    assert controller.plan["0"]["forward.x"] == controller.plan["0"]["forward.w"] == "fp4"
    with torch.no_grad():  # log-normal magnitudes: fp4's 32-blocks flush most of them
        model[0].weight.copy_(torch.randn(64, 128) * torch.exp(2.5 * torch.randn(64, 128)))
    wide = AutoPrecision(model, "fp4")
    _observed_step(wide, model, torch.randn(256, 128, requires_grad=True), 1)
    assert wide.plan["0"]["forward.w"] not in ("fp4", "fp6")
    assert wide.plan["0"]["forward.x"] == "fp4"


def test_non_finite_step_is_retried_in_higher_precision_not_lost(lm_config):
    trainer = Trainer(lm_config(recipe="auto", steps=3), quiet=True)
    trainer.step()  # the first step plans: fp8 everywhere on this model
    controller = trainer.monitor.controller
    assert controller.plan["model.layers.1.mlp.down_proj"]["forward.x"] == "fp8"
    layer = trainer.model.model.layers[1].mlp.down_proj
    original = layer.forward

    def overflows_in_fp8(x):  # a layer that blows up whenever its input is fp8 tensorwise
        out = original(x)
        return out * math.inf if layer.spec.forward.a == operand_spec("fp8", "forward.x") else out

    layer.forward = overflows_in_fp8
    before = [p.detach().clone() for p in trainer.params]
    out = trainer.step()
    assert math.isfinite(out["loss"]) and out["stepped"] and trainer.step_idx == 2
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
    assert controller.plan["model.layers.1.mlp.down_proj"]["forward.x"] == "mxfp8"
    changes = controller.history[-1]["changes"]
    assert {c["layer"] for c in changes} == {"model.layers.1.mlp.down_proj"}  # only the culprit
    assert changes[0]["why"] == "non-finite step retried"
    assert controller.plan["model.layers.1.mlp.up_proj"]["forward.x"] == "fp8"
    auto = dict(trainer.records)["auto"]
    assert auto["retries"] == 2  # one unobserved failure, one observed failure, then success


def test_plan_is_logged_saved_in_checkpoints_and_restored(lm_config, tmp_path):
    config = lm_config(recipe="auto", steps=2, eval_interval=2, stats_interval=1)
    result = train(config, quiet=True)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    splits = {r["split"] for r in records}
    assert {"auto", "plan", "stats"} <= splits
    plan_record = next(r for r in records if r["split"] == "plan")
    assert plan_record["model.layers.0.mlp.down_proj/forward.x"] == "fp8"
    timeline = plan_over_time(result.run_dir).splitlines()
    assert timeline[0].startswith("| step | fp8 | mxfp8 | bf16 | <= 8 bits")
    assert timeline[2].startswith("| 1 | 168 | 0 | 0 | 100% | 8.00 | 168 |")  # the first plan
    state = torch.load(result.checkpoint, weights_only=False)
    assert state["monitor"]["auto"]["plan"]["model.layers.0.mlp.down_proj"]["forward.x"] == "fp8"
    # evaluation rebuilds the planned numerics from the checkpoint: the same loss
    metrics, _ = evaluate_run(result.run_dir, max_batches=1)
    assert metrics["loss"] == result.final_metrics["loss"]
    resumed = Trainer(config, quiet=True)
    resumed.load_state_dict(state)
    assert resumed.monitor.controller.plan == state["monitor"]["auto"]["plan"]
    spec = resumed.model.model.layers[0].mlp.down_proj.lowbit_state.spec
    assert spec.forward.a.format == "fp8_e4m3"


def test_sqnr_threshold_is_24_db_or_3_db_below_a_rungs_nominal_whichever_is_lower():
    """The floor follows the rung's own typical SQNR where that is near or below 24 dB, so that
    an operand as good as its format is on normal data passes: MX fp4 (~18.8 dB nominal) at
    most 3 dB below it, fp8 e5m2 (~25.6 dB) down to ~22.6 dB, e4m3 (~31 dB) at 24 dB."""
    from lowbit.diagnostics.auto import judge
    from lowbit.diagnostics.stats import nominal_stats

    for rung, operand in [
        ("fp4", "forward.x"),
        ("fp8", "grad_input.grad_out"),
        ("fp8", "forward.x"),
    ]:
        nominal = nominal_stats(operand_spec(rung, operand))
        floor = min(24.0, nominal["sqnr"] - 3)
        assert judge({**nominal, "sqnr": floor + 0.1}, nominal=nominal) is None, (rung, operand)
        assert judge({**nominal, "sqnr": floor - 0.1}, nominal=nominal) == "low SQNR"


def test_guard_does_not_blame_mx_operands_for_the_clipping_their_format_does_by_design():
    """Under ``auto:fp4`` MX e2m1 clips ~2% of a normal block by design: every such operand
    counted as 'saturated' and was moved up after a non-finite step, instead of the layer
    whose output went non-finite (the one before the first non-finite layer input)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(128, 128) for _ in range(3)))
    lowbit.convert(model, "auto:fp4")
    controller = AutoPrecision(model, "fp4")
    _observed_step(controller, model, torch.randn(256, 128, requires_grad=True), 1)
    assert {rung for ops in controller.plan.values() for rung in ops.values()} == {"fp4"}
    original = model[1].forward
    model[1].forward = lambda x: original(x) * math.inf  # the middle layer overflows
    controller.collector.attach()
    model.forward(torch.randn(256, 128, requires_grad=True)).square().mean().backward()
    changes = controller.escalate(controller.collector.collect(), 2)
    assert {(c["layer"], c["operand"]) for c in changes} == {("1", op) for op in OPERANDS}
    assert set(controller.plan["0"].values()) == set(controller.plan["2"].values()) == {"fp4"}
