"""Session 38's walk of `lowbit doctor` and `auto` as a user asking "which layer is in trouble,
and what should I keep in higher precision": an --override that names no layer, fp16-low's
gradient underflow (for which a bf16 override hid the flag and fixed nothing), and why `auto`
put each operand where it is."""

import json
import math
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.diagnostics.stats import OPERANDS

PROBE = ["doctor", "--model", "nano", "--probe-steps", "1", "--seq-len", "16", "--batch-size", "2"]


def test_an_override_that_names_no_layer_is_refused_and_nothing_is_written(tmp_path, capsys):
    """A misspelt pattern probed the recipe without the fix under one warning, and the check of
    the fix read as the fix failing; the report of that probe replaced the one before it. The
    refusal is one line: the trainer's warnings of the override and of emulation came first."""
    out = tmp_path / "doctor"
    out.mkdir()
    (out / "doctor.json").write_text("earlier report\n")
    typo = "model.layer.0.mlp.down_proj=keep"  # model.layers
    argv = [*PROBE, "--recipe", "fp8-tensorwise", "--out", str(out), "--override", typo]
    assert main([*argv, "--overwrite"]) == 2
    printed, err = capsys.readouterr()
    assert printed == ""  # no probe, no table
    (error,) = err.splitlines()
    assert error.startswith(f"lowbit: error: --override '{typo}' applies to no layer")
    assert "model.layers.0.mlp.down_proj" in error  # the nearest name, as the table writes it
    assert "fix: a PATTERN matching the layer names" in error
    assert (out / "doctor.json").read_text() == "earlier report\n"
    assert not (out / "doctor.png").exists()


def test_an_override_another_one_before_it_decides_is_refused_naming_both(tmp_path, capsys):
    """Two overrides of one layer: the second decides nothing, and the fix offered was "a
    PATTERN matching the layer names", which it was already."""
    layer = "model.layers.0.mlp.down_proj"
    argv = [*PROBE, "--recipe", "fp8-tensorwise", "--out", str(tmp_path / "doctor")]
    argv += ["--override", f"{layer}=keep", "--override", f"{layer}=mxfp8"]
    assert main(argv) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith(f"lowbit: error: --override '{layer}=mxfp8' applies to no layer")
    assert error.endswith(
        f"fix: drop '{layer}=mxfp8' or '{layer}=keep', or give first the one you mean"
    )
    assert not (tmp_path / "doctor").exists()


def test_fp16_low_gradient_underflow_gets_no_bf16_override_that_hides_it(tmp_path, capsys):
    """fp16-low's gradients are fp16 already: the doctor counts their subnormals, what is left of
    values that underflowed upstream in fp16 arithmetic, and suggested putting them in bf16.
    Probed with that override the flag was gone (a bf16 cast of them flushes nothing) while the
    gradient was the same, rounded to bf16 (55.8 dB where it was exact) and the probe loss equal
    to 6 digits: the suggestion hid the trouble. The loss scale is the fix named."""
    out = tmp_path / "doctor"
    assert main([*PROBE, "--recipe", "fp16-low", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "doctor.json").read_text())
    flagged = [r for r in report["rows"] if r["reason"]]
    assert flagged and all(r["sqnr"] == "inf" for r in flagged)  # their casts lost nothing
    assert report["suggestions"] == []
    assert "suggested overrides: none (the flagged gradients underflowed before their casts" in (
        printed
    )
    (flag,) = [f for f in report["flags"] if f["pattern"] == "fp16-gradient-underflow"]
    assert "a higher starting --loss-scale" in flag["detail"]
    assert flag["detail"].endswith("or bf16 gradients (--recipe bf16-low)")


def test_an_auto_run_says_what_it_picked_per_operand_and_why(lm_config, monkeypatch):
    """The plan was logged (operand -> rung) but not why: the reasons each move had were kept in
    the checkpoint only, and the run's summary said nothing of `auto` but "loss scale 1"."""
    from lowbit.diagnostics import monitor
    from lowbit.diagnostics.auto import moves_after_first_plan
    from lowbit.train import train

    controller_for = monitor.controller_for

    def every_step(model, recipe, **options):  # a check every step: moves within 4 steps
        return controller_for(model, recipe, check_interval=1, **options)

    monkeypatch.setattr(monitor, "controller_for", every_step)
    result = train(lm_config(model="nano", recipe="auto:fp4", steps=4), quiet=True)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    moves = [r for r in records if r["split"] == "moves"]
    plans = [r for r in records if r["split"] == "plan"]
    first = {k: v for k, v in moves[0].items() if k not in ("step", "split")}
    planned = {k: v for k, v in plans[0].items() if k not in ("step", "split")}
    assert moves[0]["step"] == 1 and set(first) == set(planned)  # every operand, and why
    for key, why in first.items():
        rung = planned[key]
        assert why.startswith(f"bf16 -> {rung}: initial plan: "), why
        if rung == "fp4":
            assert why.endswith("the cheapest rung passes")
        else:  # the cheaper rungs it failed, and how
            assert "fp4 " in why.split("initial plan: ")[1], why
    later = [(r["step"], k, v) for r in moves[1:] for k, v in r.items() if "/" in k]
    assert later, "no operand moved after the first plan"
    for *_, why in later:
        assert why.split(": ")[1] in ("underflow", "low SQNR", "saturation", "stable for 2 checks")
    listing = moves_after_first_plan(result.run_dir, limit=1000).splitlines()
    assert listing[0] == "moved after the first plan:"
    step, key, why = later[-1]
    assert listing[-1] == f"  step {step}  {key.replace('/', ' ')} {why}"

    last = [r for r in records if r["split"] == "auto"][-1]
    counts = ", ".join(
        f"{last[f'n_{rung}']} {rung}"
        for rung in ("fp4", "fp6", "fp8", "mxfp8", "bf16")
        if last[f"n_{rung}"]
    )
    changed = ", ".join(str(r["step"]) for r in records if r["split"] == "auto")
    assert (
        f"  auto plan        {counts} of 126 operands ({last['mean_bits']:.2f} mean bits); "
        f"set at step {changed.replace(', ', ', changed at ', 1)}"
    ) in result.summary().splitlines()


def test_an_auto_cnn_says_why_its_first_convolution_stays_in_bf16(tmp_path):
    """The first convolution reads the pixels and stays in bf16 whatever a check measures: the
    log held its bf16 plan and no reason, where the other layer's moves had theirs."""
    from lowbit.train import TrainConfig, train

    config = TrainConfig(
        task="image-classification", recipe="auto", steps=1, device="cpu", out=str(tmp_path)
    )
    result = train(config, quiet=True)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    (moves,) = [r for r in records if r["split"] == "moves"]
    held = {k: v for k, v in moves.items() if k.startswith("features.0/")}
    # four: its input-gradient GEMM never runs (the pixels need no gradient), so neither of that
    # GEMM's operands is counted or held (session 41; until then 6 of 12 operands)
    assert len(held) == 4
    assert set(held.values()) == {"bf16: kept, the layer reads the model's input (raw data)"}
    assert "  auto plan        6 fp8, 4 bf16 of 10 operands (11.20 mean bits); set at step 1" in (
        result.summary().splitlines()
    )


def test_the_heat_map_draws_noise_below_the_threshold_pale(tmp_path):
    """doctor.png's colours were scaled to the largest loss alone: a healthy mxfp4 probe's
    0.4 dB below nominal was drawn black, darker than any flagged cell (most of which are
    flagged for underflow, at no SQNR loss), and read as the layer in trouble."""
    from matplotlib.image import imread

    from lowbit.diagnostics.doctor import Diagnosis, Row, heatmap

    def dark_pixels(losses: list[float]) -> int:
        rows = [
            Row(f"layer{i}", "forward.x", "fp4_e2m1", 18.8 - loss, 18.8, 0.0, 0.0, 1.0, 3.0)
            for i, loss in enumerate(losses)
        ]
        path = tmp_path / f"{losses}.png"
        heatmap(Diagnosis("mxfp4", 2, rows), path)
        rgb = imread(path)[..., :3]
        return int((rgb.mean(axis=-1) < 0.25).sum())  # text, and cells near the scale's top

    healthy, noisy = dark_pixels([0.0, 0.0]), dark_pixels([0.4, 0.0])
    assert noisy < healthy + 200  # the cell, a tenth of the way to the 6 dB flag, stays pale
    assert dark_pixels([20.0, 0.0]) > healthy + 3000  # a loss well past the flag is dark


def test_the_moves_of_the_attempt_the_guard_gives_up_on_are_logged(lm_config, monkeypatch):
    """The guard moves the operands it blames up at every failed attempt, the last one's too,
    and the trainer then stops the run: metrics.jsonl said "non_finite" and not which operands
    the guard blamed (that attempt's moves were applied and in no record)."""
    from lowbit.diagnostics import monitor
    from lowbit.recipes.auto import operand_spec
    from lowbit.train.trainer import NonFiniteLoss, Trainer

    controller_for = monitor.controller_for

    def one_retry(model, recipe, **options):  # an unobserved failure, then an observed one
        return controller_for(model, recipe, max_retries=1, **options)

    monkeypatch.setattr(monitor, "controller_for", one_retry)
    trainer = Trainer(lm_config(recipe="auto", steps=2, seq_len=16, batch_size=2), quiet=True)
    layer = trainer.model.model.layers[1].mlp.down_proj
    original = layer.forward

    def overflows_in_fp8(x):  # fine at step 1 (bf16, before the first plan), inf from step 2
        out = original(x)
        return out * math.inf if layer.spec.forward.a == operand_spec("fp8", "forward.x") else out

    layer.forward = overflows_in_fp8
    with pytest.raises(NonFiniteLoss):
        trainer.fit()
    records = [json.loads(line) for line in (Path(trainer.config.out) / "metrics.jsonl").open()]
    (moves,) = [r for r in records if r["split"] == "moves" and r["step"] == 2]
    blamed = {k: v for k, v in moves.items() if k not in ("step", "split")}
    assert set(blamed) == {f"model.layers.1.mlp.down_proj/{op}" for op in OPERANDS}
    assert set(blamed.values()) == {
        "fp8 -> mxfp8: non-finite step, not retried: the guard's retries (1) were spent"
    }
