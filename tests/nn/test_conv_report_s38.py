"""Session 38: a CNN user's `print(lowbit.convert(model, recipe))` shows which layers were
converted and why the rest were kept."""

from torch import nn

import lowbit
from lowbit.nn.conv import DEPTHWISE_KEPT


def test_printing_the_report_of_a_users_cnn_prints_its_summary():
    """print(report) printed the dataclass: two dicts of layer names on one line of 900
    characters, the kept layers' reasons repeated for each."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.Conv2d(16, 32, 1),
        nn.ConvTranspose2d(32, 8, 2, stride=2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )
    report = lowbit.convert(model, "fp8-rowwise")
    assert (
        str(report)
        == report.summary()
        == "\n".join(
            [
                "converted 3/5 layers",
                f"  kept 1: {DEPTHWISE_KEPT}: 2",
                "  kept 1: classification head kept in high precision: 6",
            ]
        )
    )
