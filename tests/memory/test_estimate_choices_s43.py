"""`lowbit estimate`'s closed choices refuse an unknown value with a fix, as train's do (session 43)."""

import pytest

from lowbit.cli import main


@pytest.mark.parametrize(
    ("flag", "value", "fix"),
    [
        ("--sharding", "zero", "fix: --sharding none, ddp or fsdp"),
        ("--strategy", "zero", "fix: --strategy none, ddp or fsdp"),
        ("--task", "tagging", "fix: --task causal-lm or token-classification"),
    ],
)
def test_an_unknown_choice_names_the_valid_ones_and_the_fix(capsys, flag, value, fix):
    assert main(["estimate", "--model", "tiny", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"unknown {flag[2:]} {value!r}" in err or f"unknown sharding {value!r}" in err
    assert err.rstrip().endswith(fix), err
