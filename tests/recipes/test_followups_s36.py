"""Session 36: every refusal of an ``--override`` names the problem and its fix (``foo=bar`` had
no fix; a format the operand's scaling refuses named neither the override nor a fix that an
override can follow)."""

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.recipes import get_recipe, parse_override


@pytest.mark.parametrize(
    ("recipe", "text", "problem", "fix"),
    [
        ("fp8-tensorwise", "foo=bar", "'bar' is not OPERAND:FORMAT", "OPERAND:FORMAT with"),
        ("fp8-tensorwise", "foo", "is not PATTERN=WHAT", "write it as e.g. 'lm_head=keep'"),
        (
            "fp8-tensorwise",
            "foo=forward.x:bf16,forward.x:fp32",
            "names forward.x more than once",
            "name each operand once",
        ),
        (
            "fp8-tensorwise",
            "foo=forward.x:fp7",
            "unknown number format 'fp7'",
            "give forward.x a format its tensor scaling takes, or fp32, bf16 or fp16",
        ),
        (
            "mxfp8",
            "foo=forward.x:int4",
            "granularity 'mx' needs a float element format, got int4",
            "give forward.x a format its mx scaling takes",
        ),
        (
            "nvfp4",
            "foo=forward.w:fp8_e4m3",
            "granularity 'nvfp4' needs format fp4_e2m1",
            "give forward.w a format its nvfp4 scaling takes",
        ),
        (  # its own fix spoke of the Python API (cast(x, 'e8m0')), not of an override
            "fp8-tensorwise",
            "foo=forward.x:e8m0",
            "e8m0 is a scale format",
            "give forward.x a format its tensor scaling takes",
        ),
    ],
)
def test_every_override_refusal_names_the_override_and_a_fix(recipe, text, problem, fix):
    with pytest.raises(UsageError) as caught:
        parse_override(text, get_recipe(recipe))
    message = str(caught.value)
    assert message.startswith(f"override {text!r}") and message.count("; fix: ") == 1
    before, after = message.split("; fix: ")
    assert problem in before and after.startswith(fix)


def test_train_override_foo_bar_is_one_line_with_a_fix(tmp_path, capsys):
    argv = ["train", "--override", "foo=bar", "--steps", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: override 'foo=bar': 'bar' is not OPERAND:FORMAT; fix: ")
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()
