"""Session 28: numeric training settings out of range are one line with a fix."""

import pytest

from lowbit.cli import main


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"), ("--weight-decay", "nan"),
     ("--grad-clip", "nan"), ("--min-lr", "-0.1"), ("--warmup-steps", "-1")],
)  # fmt: skip
def test_a_non_finite_or_negative_setting_is_one_line_with_its_fix(tmp_path, capsys, flag, value):
    """A negative lr or weight decay was refused without a fix."""
    out = tmp_path / "run"
    assert main(["train", flag, value, "--steps", "1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    name = flag.lstrip("-").replace("-", "_")
    assert len(err.splitlines()) == 1 and "fix:" in err and name in err, err
    assert not out.exists()
