"""results.json agrees with itself on a diverged run's train loss (review R7): its recipe's row read
null (`_train_loss`) while ``runs.<recipe>[i].train_loss`` held the mean of the steps before the
divergence."""

import json

import pytest

from lowbit.cli import main

from .test_report_numbers_s40 import NAN


@pytest.fixture(scope="module")
def nan_study(tmp_path_factory):
    """fp16-mixed at lr 50 overflows at its second step and ends with a NaN validation loss."""
    out = tmp_path_factory.mktemp("nan") / "img"
    assert main(["compare", "--recipes", "fp32,fp16-mixed", *NAN, "--out", str(out)]) == 0
    return out


def test_a_diverged_runs_train_loss_is_null_in_runs_as_in_its_recipe(nan_study):
    record = json.loads((nan_study / "runs/fp16-mixed/seed-0/compare.json").read_text())
    assert record["train_loss"] is not None  # the run's own record keeps its steps' mean
    results = json.loads((nan_study / "report" / "results.json").read_text())
    assert results["recipes"]["fp16-mixed"]["train_loss"] == [None, None]
    assert [run["train_loss"] for run in results["runs"]["fp16-mixed"]] == [None]
    fp32 = results["runs"]["fp32"][0]["train_loss"]
    assert results["recipes"]["fp32"]["train_loss"][0] == pytest.approx(fp32)
