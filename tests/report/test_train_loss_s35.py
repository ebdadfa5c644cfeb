"""Session 35: a user recomputing the report's train loss by hand from a run's metrics.jsonl took
its last training step's loss and got another number: the column holds the run's mean over its
last steps (`lowbit train`'s summary), which the report now says, with the window."""

import json
import statistics

from tests.report.test_hunt_s25 import _loss_row

WINDOW = 20  # the steps the report's caption names


def _train_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def test_report_says_what_its_train_loss_is_and_it_holds(image_study):
    report = (image_study / "report" / "report.md").read_text()
    assert f"mean over its last {WINDOW} training steps" in report
    for recipe, row in (("fp32", "fp32 (baseline)"), ("bf16-mixed", "bf16-mixed")):
        means = []
        for seed in (0, 1):
            losses = _train_losses(image_study / "runs" / recipe / f"seed-{seed}")
            means.append(statistics.fmean(losses[-WINDOW:]))
        mean, _ = _loss_row(report, row)[1].split(" ± ")
        assert float(mean) == round(statistics.fmean(means), 4)
