"""Session 26's audit of the figures in `lowbit compare`'s report, recomputed from the runs'
records: what results.json says where report.md says there is no spread."""

import json
import math

import pytest

from lowbit.cli import main

LM_FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
LM_FLAGS += ["--steps", "2", "--eval-interval", "2", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    """fp32 against bf16-mixed, one seed: its report folder."""
    out = tmp_path_factory.mktemp("math_s26") / "one"
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--seeds", "1", *LM_FLAGS, "--quiet"]
    assert main([*argv, "--no-plots", "--threads", "1", "--out", str(out)]) == 0
    return out / "report"


def test_one_seed_has_no_spread_in_results_json_either(one_seed):
    """A one-seed study's report.md shows each figure without a ± (one seed has no spread), but
    results.json recorded every std and gap spread as 0.0, which reads as seeds that agree
    exactly: a script judging ``|gap| > 2 x spread`` from it called every nonzero gap of a
    one-seed study significant, where the report says no significance test was made."""
    results = json.loads((one_seed / "results.json").read_text())
    record = json.loads((one_seed.parent / "runs/bf16-mixed/seed-0/compare.json").read_text())
    base = json.loads((one_seed.parent / "runs/fp32/seed-0/compare.json").read_text())
    row = results["recipes"]["bf16-mixed"]
    loss, base_loss = record["final_metrics"]["loss"], base["final_metrics"]["loss"]
    assert row["val_gap_pct"] == 100 * (loss - base_loss) / base_loss
    assert row["val_loss"] == [loss, None] and row["train_loss"][1] is None
    assert row["val_gap_spread_pct"] is None and row["train_gap_spread_pct"] is None
    assert row["metrics"]["ppl"] == [record["final_metrics"]["ppl"], None]
    assert row["skipped_steps"] == [0, None]
    assert "1 seed: no spread" in row["verdict"]
    report = (one_seed / "report.md").read_text()
    table = next(line for line in report.splitlines() if line.startswith("| bf16-mixed |"))
    assert "±" not in table and "nan" not in table
    assert table.split(" | ")[6] == "0"  # skipped steps: the count, not "0.00 ± nan"
    assert math.isfinite(row["val_gap_pct"])
