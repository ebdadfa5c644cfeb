"""Session 40's walk of `lowbit doctor` as a user asking which layer is in trouble in fp8/fp4:
a second probe of the same recipe (the check of a fix) replaced the first one's report without a
word; the fp16 gradient-underflow pattern judged another step than the table; an SR spec's
nominal moved from run to run; and the nominal underflow a row is judged against was unwritten."""

import json

from lowbit.cli import main

# one short probe step of the nano LM
PROBE = ["doctor", "--recipe", "fp8-tensorwise", "--model", "nano", "--probe-steps", "1"]
SMALL = ["--seq-len", "16", "--batch-size", "2"]


def _earlier_report(folder):
    folder.mkdir(parents=True)
    (folder / "doctor.json").write_text('{"recipe": "earlier"}\n')
    return folder / "doctor.json"


def test_an_out_holding_a_report_is_refused_without_overwrite(tmp_path, capsys):
    """As `lowbit train` refuses an --out holding a run: the earlier report is kept."""
    out = tmp_path / "report"
    earlier = _earlier_report(out)
    assert main([*PROBE, *SMALL, "--out", str(out)]) == 2
    printed, err = capsys.readouterr()
    assert printed == ""  # no probe ran
    assert err == (
        f"lowbit: error: {out}: holds an earlier doctor report (doctor.json); fix: --overwrite "
        "to replace it, or another --out\n"
    )
    assert earlier.read_text() == '{"recipe": "earlier"}\n'
    assert main([*PROBE, *SMALL, "--out", str(out), "--overwrite"]) == 0
    assert json.loads(earlier.read_text())["recipe"] == "fp8-tensorwise"


def test_the_default_out_holding_a_report_goes_on_to_a_fresh_folder(tmp_path, monkeypatch, capsys):
    """The default runs/doctor-RECIPE: the probe before a fix and the one checking it (the same
    recipe with --override) both wrote there, the first report lost."""
    monkeypatch.chdir(tmp_path)
    earlier = _earlier_report(tmp_path / "runs" / "doctor-fp8-tensorwise")
    assert main([*PROBE, *SMALL]) == 0
    fresh = tmp_path / "runs" / "doctor-fp8-tensorwise-2"
    assert capsys.readouterr().out.endswith(
        f"wrote {fresh.relative_to(tmp_path) / 'doctor.json'} and "
        f"{fresh.relative_to(tmp_path) / 'doctor.png'}\n"
    )
    assert earlier.read_text() == '{"recipe": "earlier"}\n'
    assert json.loads((fresh / "doctor.json").read_text())["recipe"] == "fp8-tensorwise"


def _fp16_probe(underflows):
    """A recorded fp16-mixed probe: one fp16 output gradient's underflow at each step."""
    grad = {"format": "fp16", "amax": 1.0, "rms": 1.0, "sqnr": 70.0}
    return {
        "loss_scales": [65536.0] * len(underflows),
        "initial_loss_scale": 65536.0,
        "dynamic_scaling": True,
        "per_step": [{"l": {"grad_input.grad_out": {**grad, "underflow": u}}} for u in underflows],
        "rounded_away": [],
    }


def test_fp16_gradient_underflow_is_judged_on_the_steps_the_table_averages():
    """The pattern judged the last probe step alone: "8 fp16 gradient operands flush more than
    1%" above a table whose worst such row read 0.63% (fp16-mixed, tiny LM, 3 steps: 0.47%,
    0.35%, 1.06%), and an operand flushing 2% until the last step went unflagged."""
    from lowbit.diagnostics.doctor import failure_patterns

    assert failure_patterns(_fp16_probe([0.0047, 0.0035, 0.0106])) == []
    flags = failure_patterns(_fp16_probe([0.02, 0.02, 0.005]))
    assert [f["pattern"] for f in flags] == ["fp16-gradient-underflow"]
    assert flags[0]["operands"] == ["l:grad_input.grad_out"]


def test_the_nominal_of_a_stochastically_rounded_spec_is_seeded():
    """Its SR noise was drawn from the global generator: the nominal the doctor judges MX e2m1
    with SR against moved between two probes of the same recipe (15.61 and 15.69 dB), and the
    draw moved the random numbers of the training it was computed in."""
    import torch

    from lowbit.diagnostics.stats import nominal_stats
    from lowbit.recipes import OperandSpec

    spec = OperandSpec("fp4_e2m1", "mx", block_size=32, rounding="stochastic")
    torch.manual_seed(1)
    before = torch.get_rng_state()
    assert nominal_stats(spec, shape=(40, 64))["underflow"] > 0  # it rounded (and flushed)
    assert torch.equal(torch.get_rng_state(), before)  # with no draw from the global generator


def test_doctor_json_rows_hold_the_underflow_they_are_judged_against():
    """A row of MX fp4 flushing 11.8% was flagged for underflow and one flushing 11.5% was not
    (GPT-2, mxfp4): the share each is judged against, its spec's nominal, was nowhere to read."""
    from lowbit.diagnostics.doctor import Diagnosis, rows_from
    from lowbit.diagnostics.stats import nominal_stats
    from lowbit.recipes import OperandSpec

    spec = OperandSpec("fp4_e2m1", "mx", block_size=32)
    nominal = nominal_stats(spec)
    stats = {"spec": spec.describe(), "format": "fp4_e2m1", "sqnr": nominal["sqnr"]}
    stats |= {"saturated": 0.0, "nonfinite": 0.0, "noise_saturated": 0.0, "noise_underflow": 0.0}
    stats |= {"amax": 1.0, "rms": 0.3}
    step = {
        "fine": {"forward.x": {**stats, "underflow": nominal["underflow"] + 0.005}},
        "flushed": {"forward.x": {**stats, "underflow": nominal["underflow"] + 0.015}},
    }
    rows = rows_from([step], {spec.describe(): spec})
    judged = {r["layer"]: r for r in Diagnosis("mxfp4", 1, rows).to_json()["rows"]}
    assert judged["flushed"]["reason"] == "underflow" and judged["fine"]["reason"] == ""
    for row in judged.values():
        assert row["nominal_underflow"] == nominal["underflow"]
        assert 0.05 < row["nominal_underflow"] < 0.15  # MX e2m1 flushes ~9% of a normal tensor
