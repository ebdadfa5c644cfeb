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


def _live_doctor(folder):
    """A doctor writing into ``folder`` now: its lock held (by this process's own descriptor, as
    another process's would be), its probe/ made."""
    from lowbit.folder_lock import lock_folder

    (folder / "probe").mkdir(parents=True)
    held = lock_folder(folder)
    assert held not in (None, False)
    return held


def test_a_second_doctor_goes_past_the_default_folder_a_live_one_writes_into(
    tmp_path, monkeypatch, capsys
):
    """Two doctors started together (seeds 1 and 2) both printed `wrote
    runs/doctor-bf16-mixed/doctor.json`, one report lost, both probes trained in one probe/."""
    import os

    monkeypatch.chdir(tmp_path)
    first = tmp_path / "runs" / "doctor-fp8-tensorwise"
    held = _live_doctor(first)
    try:
        assert main([*PROBE, *SMALL]) == 0
    finally:
        os.close(held)
    assert capsys.readouterr().out.endswith(
        "wrote runs/doctor-fp8-tensorwise-2/doctor.json and runs/doctor-fp8-tensorwise-2/doctor.png\n"
    )
    assert sorted(p.name for p in first.iterdir()) == ["probe"]  # the live doctor's, untouched


def test_an_out_a_live_doctor_writes_into_is_refused_naming_it(tmp_path, capsys):
    """An explicit --out is refused in one line, as `lowbit train` refuses a live run's folder
    (--overwrite too: it replaces an earlier report, not one being written)."""
    import os

    out = tmp_path / "report"
    held = _live_doctor(out)
    try:
        for overwrite in ([], ["--overwrite"]):
            assert main([*PROBE, *SMALL, "--out", str(out), *overwrite]) == 2
            printed, err = capsys.readouterr()
            assert printed == ""  # no probe ran
            assert err == (
                f"lowbit: error: {out}: another lowbit doctor is writing its "
                "report into this folder; fix: wait until it ends (or stop it), or choose "
                "another --out\n"
            )
    finally:
        os.close(held)
    assert sorted(p.name for p in out.iterdir()) == ["probe"]


def test_an_out_a_run_trains_into_is_refused_as_lowbit_train_refuses_it(tmp_path, capsys):
    """The report and the probe's folder went into a live run's folder beside its files."""
    import os
    import socket

    from lowbit.folder_lock import lock_folder

    run = tmp_path / "run"
    run.mkdir()
    info = {"status": "running", "pid": os.getpid(), "host": socket.gethostname()}
    (run / "run.json").write_text(json.dumps(info))
    held = lock_folder(run)
    try:
        assert main([*PROBE, *SMALL, "--out", str(run)]) == 2
    finally:
        os.close(held)
    assert capsys.readouterr().err == (
        f"lowbit: error: {run}: another lowbit process (pid {os.getpid()} on host "
        f"{socket.gethostname()}) is training into this folder; fix: wait until it ends (or "
        "stop it), or choose another --out\n"
    )
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]


def test_the_nominal_of_a_stochastically_rounded_spec_leaves_the_cuda_generators_alone(
    monkeypatch,
):
    """torch.manual_seed(0) in the fork reseeded every CUDA generator, which the fork (of the CPU
    one only) never restored: an `auto` run on a GPU, which asks for each new spec's nominal while
    it trains, had its CUDA random numbers (dropout) reset mid-run."""
    import torch

    from lowbit.diagnostics.stats import nominal_stats
    from lowbit.recipes import OperandSpec

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    spec = OperandSpec("fp4_e2m1", "mx", block_size=32, rounding="stochastic")
    torch.manual_seed(1)
    seeded.clear()
    first = nominal_stats(spec, shape=(24, 64))
    assert seeded == []
    assert first == nominal_stats(spec, shape=(24, 64))


def test_an_out_in_the_config_file_is_not_ignored_without_a_word(tmp_path, monkeypatch, capsys):
    """A `lowbit train` config file's out: is its run's folder; the doctor's report went
    elsewhere without a word. (Read as the report's folder, the doctor's files would keep a later
    `lowbit train --config` from starting there: "folder is not empty".)"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("model: nano\nout: runs/mine\n")
    assert main([*PROBE, *SMALL, "--config", "c.yaml"]) == 0
    err = capsys.readouterr().err
    assert (
        "lowbit: warning: c.yaml: out ignored: it names the folder of the run, not of the "
        "doctor's report, which goes to runs/doctor-fp8-tensorwise (--out DIR to choose)\n" in err
    )
    assert not (tmp_path / "runs" / "mine").exists()
    assert (tmp_path / "runs" / "doctor-fp8-tensorwise" / "doctor.json").is_file()
