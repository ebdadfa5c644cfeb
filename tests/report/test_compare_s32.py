"""`lowbit compare`: --jobs says each warning once however its text is cut into writes; the
refusal of a --tolerance that is not a percent names its fix."""

from __future__ import annotations

import sys

from lowbit.report.parallel import warnings_once


def _said(capsys, *writes) -> list[str]:
    """stderr's lines after ``writes`` (a string written as it is; None: a flush), in order."""
    with warnings_once():
        for text in writes:
            if text is None:
                sys.stderr.flush()
            else:
                sys.stderr.write(text)
    return capsys.readouterr().err.splitlines()


def test_a_warning_said_whole_is_not_said_again_line_by_line(capsys):
    """One process printed the warning in one write, another wrote its lines one write each:
    the second judged its first line alone, new, and said the whole warning again."""
    assert _said(
        capsys,
        "lowbit: warning: keeps every layer:\n  kept 2: reason",
        "\n",
        "lowbit: warning: keeps every layer:\n",
        "  kept 2: reason\n",
        *"lowbit: warning: keeps every layer:\n  kept 2: reason\n",  # one character a write
    ) == ["lowbit: warning: keeps every layer:", "  kept 2: reason"]


def test_an_indented_line_still_being_written_is_judged_whole(capsys):
    """A write that ended inside a warning's indented line had the warning judged with the
    line's start only: the same warning, written whole before, was said again."""
    assert _said(
        capsys,
        "lowbit: warning: keeps every layer:\n  kept 2: reason\n",
        "lowbit: warning: keeps every layer:\n  kept 2: rea",
        "son\n",
        "done\n",
    ) == ["lowbit: warning: keeps every layer:", "  kept 2: reason", "done"]


def test_a_flush_inside_a_warning_said_before_does_not_say_it_again(capsys):
    """A flush wrote whatever was waiting as it was: a warning said before, whose newline had
    not come yet (the end of the study, a flush between print's two writes), was said again."""
    assert _said(
        capsys,
        "lowbit: warning: the data has 3 empty lines\n",
        "lowbit: warning: the data has 3 empty lines",
        None,
        "\n",
        "lowbit: warning: once more\n",
        "lowbit: warning: once more",  # the study ends before its newline
    ) == ["lowbit: warning: the data has 3 empty lines", "lowbit: warning: once more"]


def test_a_line_flushed_before_its_end_keeps_its_rest(capsys):
    """A new warning flushed before its end is said, and its rest with it; other text flushed
    before its end (a progress line, the start of 'lowbit: ...' that is not a warning) is said
    as it is."""
    assert _said(
        capsys,
        "lowbit: warning: a",
        None,
        "b\n  its line",
        None,
        " ends here\n",
        "step 10",
        None,
        " of 20\n",
        "lowbit: w",
        None,
        "ill stop\n",
    ) == ["lowbit: warning: ab", "  its line ends here", "step 10 of 20", "lowbit: will stop"]


def test_a_tolerance_that_is_not_a_percent_names_its_fix(tmp_path, capsys):
    """The refusal named the problem without the fix every other refusal of compare names."""
    from lowbit.cli import main

    out = tmp_path / "study"
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--steps", "1", "--out", str(out)]
    for bad in ("nan", "-1"):
        assert main([*argv, "--tolerance", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("; fix: e.g. --tolerance 1") and len(err.splitlines()) == 1
        assert not out.exists()
