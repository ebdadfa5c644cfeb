"""Session 29 hunt of `lowbit doctor` and the `auto` recipe."""

import json

from lowbit.cli import main

BASE = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--device", "cpu"]


def test_steps_a_loss_scale_skipped_are_named_not_blamed_on_the_gradient_formats(tmp_path, capsys):
    """fp16-mixed started at a loss scale the gradients overflow: the scaler skips every probe
    step. The doctor flagged every output gradient "non-finite" and suggested bf16 overrides for
    them (fixing nothing: the scale overflowed, not fp16), with "failure patterns: none seen"."""
    out = tmp_path / "doctor"
    args = ["--recipe", "fp16-mixed", "--loss-scale", "1e30", "--probe-steps", "2"]
    assert main(["doctor", *BASE, *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "doctor.json").read_text())
    assert [f["pattern"] for f in report["flags"]] == ["loss-scale-overflow"]
    assert report["flags"][0]["steps"] == [1, 2]
    assert "2 of 2 probe steps overflowed" in printed and "--loss-scale" in printed
    assert not any(r["reason"] == "non-finite" for r in report["rows"])
    assert not any(r["operand"].endswith("grad_out") for r in report["rows"])
    assert report["suggestions"] == []


def test_a_collapsed_loss_scale_keeps_the_overflowing_gradients_in_the_table():
    """Skipped steps whose scale collapsed overflow at every scale: their gradient operands are
    the trouble (the collapse's fix puts them in bf16), not the scaler's search to be left out."""
    from lowbit.diagnostics.doctor import failure_patterns

    grad = {"format": "fp16", "underflow": 0.0}
    probe = {
        "loss_scales": [2.0**-1, 2.0**-2],
        "initial_loss_scale": 1.0,
        "dynamic_scaling": True,
        "per_step": [{"fc": {"grad_input.grad_out": grad}}] * 2,
        "skipped": [True, True],
        "rounded_away": [],
    }
    assert [f["pattern"] for f in failure_patterns(probe)] == ["loss-scale-collapse"]
    searching = {**probe, "loss_scales": [2.0**15, 2.0**14], "initial_loss_scale": 2.0**16}
    flags = failure_patterns(searching)
    assert [f["pattern"] for f in flags] == ["loss-scale-overflow"]
    assert "65536 to 32768" in flags[0]["detail"]


def test_gradient_underflow_under_dynamic_loss_scaling_advises_a_higher_scale(tmp_path, capsys):
    """fp16-mixed scales its loss dynamically; started at 1 its gradients underflow fp16, and the
    doctor's fix was "dynamic loss scaling", which the recipe already does."""
    out = tmp_path / "doctor"
    args = ["--recipe", "fp16-mixed", "--loss-scale", "1", "--probe-steps", "1"]
    assert main(["doctor", *BASE, *args, "--out", str(out)]) == 0
    capsys.readouterr()
    flags = json.loads((out / "doctor.json").read_text())["flags"]
    (detail,) = [f["detail"] for f in flags if f["pattern"] == "fp16-gradient-underflow"]
    assert "fix: a higher starting --loss-scale (this probe's ended at 1)" in detail, detail
    assert "dynamic loss scaling" not in detail


def test_a_forward_overflow_is_not_blamed_on_the_loss_scale(lm_config):
    """A step whose loss is non-finite overflowed in the forward pass, which the loss scale does
    not touch: the scaler skips it too, but a lower --loss-scale would not help, and the layer
    whose fp16 weights overflow stays in the table with its fix."""
    import torch

    from lowbit.diagnostics.doctor import diagnose
    from lowbit.train.config import resolve

    def overflow_fp16(trainer):
        layer = dict(trainer.model.named_modules())["model.layers.0.mlp.up_proj"]
        with torch.no_grad():
            layer.weight.mul_(1e6)  # some weights beyond fp16's 65504

    config = resolve(lm_config(recipe="fp16-mixed"))
    diagnosis = diagnose(config, steps=1, prepare=overflow_fp16)
    assert not any(f["pattern"].startswith("loss-scale") for f in diagnosis.flags)
    flagged = {(r.layer, r.operand) for r in diagnosis.flagged}
    assert ("model.layers.0.mlp.up_proj", "forward.w") in flagged
    assert any(
        s.startswith("model.layers.0.mlp.up_proj=forward.w:bf16") for s in diagnosis.suggestions
    )


def test_a_folder_in_the_way_of_a_report_file_is_refused_before_the_probe(tmp_path, capsys):
    """``--out`` holding a folder named doctor.json failed only after the probe had run (minutes),
    with "fix: the path is a folder; choose a file path", a path the user never gave."""
    (tmp_path / "doctor.json").mkdir()
    assert main(["doctor", *BASE, "--recipe", "fp8-tensorwise", "--out", str(tmp_path)]) != 0
    printed = capsys.readouterr()
    assert (
        "doctor.json: a folder where the doctor writes its doctor.json; fix: choose another "
        "--out" in printed.err
    )
    assert "probe step" not in printed.out  # refused before probing


def test_a_one_step_auto_probe_says_its_operands_moved_after_the_step(tmp_path, capsys):
    """auto's first check runs in bf16 and decides the plan after the step: a one-step probe's
    table showed every operand in bf16 and nothing else, though auto had moved them all (the doc:
    each operand is judged in the spec it ends in)."""
    out = tmp_path / "doctor"
    assert main(["doctor", *BASE, "--recipe", "auto", "--probe-steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "doctor.json").read_text())
    assert report["moved_after_probe"] == len(report["rows"]) > 0
    assert f"{len(report['rows'])} operands moved to another format" in printed


def test_an_overflow_in_an_earlier_micro_batch_is_flagged(lm_config):
    """With --grad-accum the statistics kept each operand's last micro-batch: an input that was
    non-finite in the first micro-batch only (the step skipped for it) read clean, and the doctor
    flagged nothing in a probe whose every loss was NaN."""

    from lowbit.diagnostics.doctor import diagnose
    from lowbit.train.config import resolve

    def first_micro_batch_overflows(trainer):
        calls = []

        def hook(module, args):
            calls.append(1)
            if len(calls) % 2 == 1:  # the first of the step's two micro-batches
                return (args[0] * float("inf"),)
            return None

        layer = dict(trainer.model.named_modules())["model.layers.1.mlp.down_proj"]
        layer.register_forward_pre_hook(hook)

    config = resolve(lm_config(recipe="fp16-mixed", grad_accum=2))
    diagnosis = diagnose(config, steps=1, prepare=first_micro_batch_overflows)
    assert all(v != v for v in diagnosis.loss)  # NaN: the overflow reached the loss
    flagged = {(r.layer, r.operand, r.reason) for r in diagnosis.flagged}
    assert ("model.layers.1.mlp.down_proj", "forward.x", "non-finite") in flagged


def test_a_scale_started_far_too_high_is_an_overflow_at_the_default_probe_length():
    """``--loss-scale 1e30`` halves at each of the default 8 probe steps: a 256-fold fall, which
    read as a collapse ("overflow at every scale; fix: bf16"), its gradients in the table as
    non-finite, though the scale was still 1e27, far above any the gradients fit."""
    from lowbit.diagnostics.doctor import failure_patterns

    grad = {"format": "fp16", "underflow": 0.0}
    probe = {
        "loss_scales": [1e30 / 2.0**i for i in range(1, 9)],
        "initial_loss_scale": 1e30,
        "dynamic_scaling": True,
        "per_step": [{"fc": {"grad_input.grad_out": grad}}] * 8,
        "skipped": [True] * 8,
        "rounded_away": [],
    }
    flags = failure_patterns(probe)
    assert [f["pattern"] for f in flags] == ["loss-scale-overflow"]
    assert "8 of 8 probe steps overflowed" in flags[0]["detail"]
    assert "fix: a lower --loss-scale" in flags[0]["detail"]
