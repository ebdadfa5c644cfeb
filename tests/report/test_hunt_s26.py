"""Session 26's hunt through `lowbit compare`: a study continued on another device."""

import json

import pytest

from lowbit.cli import main

LM_FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
LM_FLAGS += ["--steps", "2", "--eval-interval", "2", "--warmup-steps", "1", "--seeds", "1"]
GPU = "cuda (NVIDIA H100 80GB HBM3)"


def _compare(out, *flags) -> int:
    return main(["compare", *LM_FLAGS, "--quiet", "--no-plots", "--out", str(out), *flags])


@pytest.fixture(scope="module")
def cpu_study(tmp_path_factory):
    """fp32, one seed, trained on the CPU (tests copy it before editing)."""
    out = tmp_path_factory.mktemp("s26") / "study"
    assert _compare(out, "--recipes", "fp32") == 0
    return out


def _copy(study, tmp_path):
    import shutil

    return shutil.copytree(study, tmp_path / "study")


def _edit_json(path, **changes):
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, **changes}))


def test_runs_record_their_device(cpu_study):
    results = json.loads((cpu_study / "report" / "results.json").read_text())
    assert [r["device"] for r in results["runs"]["fp32"]] == ["cpu"]


@pytest.mark.parametrize("recorded", [{"device": GPU}, {"peak_memory_kind": "cuda max allocated"}])
def test_a_finished_run_of_another_device_is_not_reused(cpu_study, tmp_path, capsys, recorded):
    """A study begun on a GPU and continued on the CPU (or the other way round, `--device
    cuda`) reused the finished runs whatever device they had trained on, and the speed and memory
    table mixed GPU and CPU throughput, CUDA peak allocations and tensor accounting. Records from
    before session 26 name no device: their peak memory's kind tells it."""
    out = _copy(cpu_study, tmp_path)
    record = out / "runs" / "fp32" / "seed-0" / "compare.json"
    saved = json.loads(record.read_text())
    if "device" not in recorded:
        del saved["device"]
    saved = {**saved, **recorded, "config": {**saved["config"], "device": "cuda"}}
    record.write_text(json.dumps(saved))
    capsys.readouterr()
    settings = (out / "compare.json").read_text()
    # bf16-mixed listed first: refused before it trains, not after
    assert _compare(out, "--recipes", "bf16-mixed,fp32", "--baseline", "fp32") == 2
    assert (out / "compare.json").read_text() == settings  # the refused command wrote nothing
    error = capsys.readouterr().err
    run_dir = out / "runs" / "fp32" / "seed-0"
    trained_on = recorded.get("device", "cuda")
    assert f"{run_dir}: holds a finished run trained on {trained_on}, now cpu" in error
    assert "fix: --device cuda as before, or another --out" in error
    assert len(error.strip().splitlines()) == 1
    assert not (out / "runs" / "bf16-mixed").exists()


def test_an_unfinished_run_of_another_device_is_not_resumed(cpu_study, tmp_path, capsys):
    """An interrupted run (a checkpoint, no record) begun on a GPU was resumed on the CPU, and its
    throughput counted the steps of both."""
    out = _copy(cpu_study, tmp_path)
    run_dir = out / "runs" / "fp32" / "seed-0"
    (run_dir / "compare.json").unlink()
    _edit_json(run_dir / "compare-jobs.json", device=GPU)
    capsys.readouterr()
    assert _compare(out, "--recipes", "fp32") == 2
    error = capsys.readouterr().err
    assert f"{run_dir}: holds an unfinished run trained on {GPU}, now cpu" in error
    assert "fix: --device cuda as before, or another --out" in error
    assert not (run_dir / "compare.json").exists()


def test_a_run_of_the_same_device_is_reused_and_resumed(cpu_study, tmp_path, capsys):
    out = _copy(cpu_study, tmp_path)
    run_dir = out / "runs" / "fp32" / "seed-0"
    record = json.loads((run_dir / "compare.json").read_text())
    assert _compare(out, "--recipes", "fp32", "--device", "cpu") == 0
    assert "(reused)" in capsys.readouterr().out
    (run_dir / "compare.json").unlink()
    assert _compare(out, "--recipes", "fp32") == 0  # resumed at its last step
    resumed = json.loads((run_dir / "compare.json").read_text())
    assert resumed["device"] == "cpu" and resumed["final_metrics"] == record["final_metrics"]


def test_parity_refuses_a_run_of_another_device_in_one_line(parity, tmp_path, capsys):
    """benchmarks/parity.py continued on another device: its runs are checked before any trains
    (a traceback from the worker, or from the task whose turn came, was the alternative)."""
    argv = ["--tasks", "image-classification", "--recipes", "fp32", "--seeds", "1"]
    argv += ["--img-steps", "1", "--jobs", "1", "--no-write", "--quiet", "--out", str(tmp_path)]
    assert parity.main(argv) == 0
    record = tmp_path / "image-classification" / "runs" / "fp32" / "seed-0" / "compare.json"
    _edit_json(record, device=GPU)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        parity.main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"holds a finished run trained on {GPU}, now cpu" in error
    assert "fix: --device cuda as before, or another --out" in error
