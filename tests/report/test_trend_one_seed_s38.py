"""Session 38: the trend line of a one-seed study said "mean over seeds" of its one run."""

import pytest

from lowbit.report.compare import baseline_trend
from lowbit.report.markdown import trend_line


@pytest.mark.parametrize(("seeds", "said"), [([3], "seed 3)"), ([0, 1, 2], "mean over seeds)")])
def test_the_trend_line_names_a_one_seed_study_s_seed(seeds, said):
    row = {"target": {"pct": 0.5, "expect_worse": False}}
    results = {
        "settings": {"seeds": seeds},
        "baseline": "fp32",
        "baseline_trend": baseline_trend([[0, 5.0], [100, 3.0], [200, 2.9]]),
        "recipes": {"fp32": row, "bf16-mixed": row},
    }
    line = trend_line(results)
    assert line.startswith("The baseline's validation loss moved -3.33% over the last 100 steps")
    assert f"(3.0000 -> 2.9000, {said}" in line
    assert ("mean over seeds" in line) == (len(seeds) > 1)
