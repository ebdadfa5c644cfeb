"""`lowbit doctor`: names the layers a case breaks, suggests overrides train accepts, flags the
known failure patterns, writes JSON and a PNG."""

import json

import pytest

from lowbit.cli import main
from lowbit.diagnostics.cases import inject_outliers
from lowbit.diagnostics.doctor import diagnose, failure_patterns, write_outputs
from lowbit.train.config import recipe_of, resolve

BROKEN = "model.layers.1.mlp.down_proj"


def test_doctor_names_the_outlier_layer_and_its_fix_is_accepted_by_train(lm_config, tmp_path):
    config = resolve(lm_config(recipe="fp8-tensorwise"))
    assert diagnose(config, steps=2).flagged == []  # the control: nothing to flag
    diagnosis = diagnose(config, steps=2, prepare=lambda t: inject_outliers(t.model, BROKEN))
    top = [r for r in diagnosis.rows[:2]]
    assert {r.layer for r in top} == {BROKEN} and {r.reason for r in top} == {"underflow"}
    assert {r.operand for r in top} == {"forward.x", "grad_weight.x"}  # the two reading x
    assert diagnosis.suggestions[0] == f"{BROKEN}=forward.x:bf16,grad_weight.x:bf16"
    # the suggestion is an override as `lowbit train --override` takes it
    fixed = recipe_of(resolve(lm_config(recipe="fp8-tensorwise", overrides=diagnosis.suggestions)))
    spec = fixed.layer_for(BROKEN)[0].operands()
    assert spec["forward.x"].format == "bf16" and spec["forward.w"].format == "fp8_e4m3"

    json_path, png_path = write_outputs(diagnosis, tmp_path / "doctor")
    saved = json.loads(json_path.read_text())
    assert saved["rows"][0]["layer"] == BROKEN and saved["suggestions"] == diagnosis.suggestions
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("recipe", ["mxfp8", "nvfp4"])
def test_block_scaled_recipes_are_not_flagged_for_what_their_format_clips(lm_config, recipe):
    """MX's rounded-down block scales clip ~1% of a normal block, NVFP4's e4m3 ones ~0.3%, by
    design: a healthy model was flagged in every operand against an absolute 1e-4."""
    diagnosis = diagnose(resolve(lm_config(recipe=recipe)), steps=2)
    assert not [row for row in diagnosis.flagged if row.reason == "saturation"]
    assert len(diagnosis.flagged) < len(diagnosis.rows) // 4  # every one was flagged


def test_doctor_cli_probes_a_checkpoint_and_prints_overrides(lm_config, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--device", "cpu"]
    assert main(["train", *base, "--steps", "2", "--out", str(run), "--quiet"]) == 0
    out = tmp_path / "doc"
    probe = ["--recipe", "fp8-tensorwise", "--probe-steps", "1", "--out", str(out)]
    code = main(["doctor", "--checkpoint", str(run), *probe])
    assert code == 0
    text = capsys.readouterr().out
    assert "lowbit doctor: recipe fp8-tensorwise, 1 probe step;" in text
    assert "failure patterns" in text
    assert (out / "doctor.json").is_file() and (out / "doctor.png").is_file()
    assert not (run / "checkpoints" / "step-0000003.pt").exists()  # the run is left alone


def test_doctor_steps_set_the_schedule_and_a_note_says_the_probe_length(tmp_path, capsys):
    """`doctor --steps 50` probes the start of a 50-step run: it does not run 50 steps, and
    says so instead of silently observing --probe-steps' default."""
    base = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--device", "cpu"]
    code = main(["doctor", *base, "--steps", "50", "--out", str(tmp_path / "doc")])
    assert code == 0
    captured = capsys.readouterr()
    assert "--steps sets the schedule of the run being probed" in captured.err
    assert "--probe-steps N" in captured.err
    assert ", 8 probe steps" in captured.out
    main(["doctor", *base, "--steps", "50", "--probe-steps", "1", "--out", str(tmp_path / "d2")])
    assert "note" not in capsys.readouterr().err  # the probe length was chosen


def test_pure_bf16_updates_rounded_away_are_flagged_and_master_weights_are_not(lm_config):
    flags = diagnose(resolve(lm_config(recipe="bf16-pure", lr=1e-5)), steps=1).flags
    assert "bf16-updates-rounded-away" in {f["pattern"] for f in flags}
    flags = diagnose(resolve(lm_config(recipe="bf16-low", lr=1e-5)), steps=1).flags
    assert "bf16-updates-rounded-away" not in {f["pattern"] for f in flags}


def _stats(fmt, underflow=0.0, amax=1.0, rms=1.0):
    return {"format": fmt, "underflow": underflow, "amax": amax, "rms": rms}


def test_failure_patterns_on_recorded_probes():
    healthy = {
        "loss_scales": [65536.0, 65536.0],
        "initial_loss_scale": 65536.0,
        "dynamic_scaling": True,
        "per_step": [{"l": {"forward.x": _stats("fp16"), "grad_weight.grad_out": _stats("fp16")}}],
        "rounded_away": [],
    }
    assert failure_patterns(healthy) == []
    collapsed = {**healthy, "loss_scales": [2.0**15, 2.0**10, 2.0**6]}
    assert [f["pattern"] for f in failure_patterns(collapsed)] == ["loss-scale-collapse"]
    underflow = {
        **healthy,
        "per_step": [{"l": {"grad_weight.grad_out": _stats("fp16", underflow=0.2)}}],
    }
    assert [f["pattern"] for f in failure_patterns(underflow)] == ["fp16-gradient-underflow"]
    growing = {
        **healthy,
        "per_step": [{"mlp": {"forward.x": _stats("fp8_e4m3", amax=a)}} for a in (20, 30, 90, 120)],
    }
    flags = failure_patterns(growing)
    assert [f["pattern"] for f in flags] == ["activation-outliers-growing"]
    assert flags[0]["layers"] == ["mlp"]
    steady = {
        **healthy,
        "per_step": [{"mlp": {"forward.x": _stats("fp8_e4m3", amax=120)}} for _ in range(4)],
    }
    assert failure_patterns(steady) == []


def test_a_recipe_without_low_precision_operands_says_so(lm_config, tmp_path, recwarn):
    diagnosis = diagnose(resolve(lm_config(recipe="bf16-mixed")), steps=1)
    assert diagnosis.rows == [] and diagnosis.suggestions == []
    assert "no layer of this model is in the recipe's low-precision formats" in diagnosis.table()
    _, png_path = write_outputs(diagnosis, tmp_path / "doctor")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [w for w in recwarn if "singular" in str(w.message)]  # no empty heat map


def test_doctor_refuses_a_table_of_no_rows(capsys):
    assert main(["doctor", "--recipe", "fp8-tensorwise", "--top", "-1"]) == 2
    assert "--top must be positive, got -1" in capsys.readouterr().err


def test_doctor_observes_the_auto_recipe_at_its_check_steps(lm_config):
    """`auto`'s controller takes the layers' observer at its check steps (the first step is
    one): the probe's statistics of those steps were lost, so a one-step probe of `auto` said
    that no layer was in low precision."""
    diagnosis = diagnose(resolve(lm_config(recipe="auto")), steps=1)
    assert len(diagnosis.rows) == 28 * 6  # 7 linear layers x 4 blocks of the tiny LM, 6 operands
    assert {r.format for r in diagnosis.rows} == {"bf16"}  # every layer starts in bf16
    # after the first check the operands run in fp8: judged there, against fp8's nominal
    diagnosis = diagnose(resolve(lm_config(recipe="auto")), steps=2)
    assert len(diagnosis.rows) == 28 * 6
    assert "bf16" not in {r.format for r in diagnosis.rows}
    assert diagnosis.flagged == []


def test_doctor_from_a_checkpoint_of_the_same_recipe_continues_its_plan(lm_config, tmp_path):
    """An `auto` run's checkpoint holds the plan its checks made (fp8 after the first): the probe
    started it again, so every operand read bf16 until a check step came."""
    from lowbit.train import train

    run = train(resolve(lm_config(recipe="auto", steps=2, out=str(tmp_path / "run"))), quiet=True)
    config = resolve(lm_config(recipe="auto", out=str(tmp_path / "probe")))
    diagnosis = diagnose(config, steps=1, checkpoint_dir=run.run_dir)
    assert len(diagnosis.rows) == 28 * 6 and "bf16" not in {r.format for r in diagnosis.rows}


def test_a_probe_that_goes_non_finite_is_diagnosed_not_a_traceback(lm_config, tmp_path):
    """A recipe whose step goes non-finite (and cannot skip it) is what the doctor is for: it
    raised NonFiniteLoss out of `lowbit doctor` instead of naming the non-finite operands."""
    # an lr far past divergence: at 1e4 one CPU's kernels went non-finite by step 3, another's not
    diagnosis = diagnose(resolve(lm_config(recipe="fp8-tensorwise", lr=1e12)), steps=3)
    assert "probe stopped" in diagnosis.stopped and "probe stopped" in diagnosis.table()
    assert "non-finite" in {r.reason for r in diagnosis.flagged}
    json_path, _ = write_outputs(diagnosis, tmp_path / "doctor")
    saved = json.loads(json_path.read_text(), parse_constant=pytest.fail)  # no bare NaN
    assert saved["stopped"] == diagnosis.stopped


def test_doctor_of_a_bpe_run_reads_its_saved_tokenizer_and_data(tmp_path, monkeypatch, capsys):
    """From another folder, with a relative --data: the run's recorded data and its saved BPE
    tokenizer (trained again, another `tokenizers` version could give the model other ids)."""
    from lowbit.data import tokenizers

    lines = [
        f'{{"text": "line {i}: the quick brown fox jumps over the lazy dog"}}' for i in range(80)
    ]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    base = ["--seq-len", "16", "--batch-size", "4", "--eval-batches", "1", "--model", "nano"]
    bpe = ["--data", "corpus.jsonl", "--tokenizer", "bpe", "--vocab-size", "300"]
    assert main(["train", *base, *bpe, "--steps", "2", "--out", "run", "--quiet"]) == 0

    def no_training(texts, vocab_size):
        raise AssertionError("doctor trained a tokenizer")

    monkeypatch.setattr(tokenizers, "train_bpe", no_training)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    probe = ["--recipe", "fp8-tensorwise", "--probe-steps", "1", "--out", "doc"]
    assert main(["doctor", "--checkpoint", str(tmp_path / "run"), *probe]) == 0
    assert "lowbit doctor: recipe fp8-tensorwise" in capsys.readouterr().out
