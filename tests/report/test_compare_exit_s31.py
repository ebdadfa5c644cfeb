"""Session 31's `lowbit compare` exit status and output: `--fail-on-miss` (a CI script could not
gate on the verdicts: the exit status was 0 whatever they said), and the --jobs stderr filter
that dropped an unrelated indented line after a repeated multi-line warning."""

import json
import shutil
import sys

import pytest

from lowbit.cli import main
from lowbit.report.parallel import warnings_once

# the study of conftest's `image_study` (IMAGES, fp32 against bf16-mixed, two seeds), as flags
ARGV = ["compare", "--recipes", "fp32,bf16-mixed", "--task", "image-classification",
        "--batch-size", "16", "--steps", "2", "--eval-batches", "1", "--seeds", "2",
        "--quiet", "--no-plots", "--threads", "1"]  # fmt: skip


def _with_losses(image_study, tmp_path, factors) -> list[str]:
    """The finished study, copied, with bf16-mixed's validation loss of seed s set to fp32's
    times ``factors[s]``; the argv that reports it again (reusing every run)."""
    out = tmp_path / "img"
    shutil.copytree(image_study, out)
    for seed, factor in enumerate(factors):
        base = json.loads((out / "runs" / "fp32" / f"seed-{seed}" / "compare.json").read_text())
        path = out / "runs" / "bf16-mixed" / f"seed-{seed}" / "compare.json"
        record = json.loads(path.read_text())
        record["final_metrics"]["loss"] = base["final_metrics"]["loss"] * factor
        path.write_text(json.dumps(record))
    return [*ARGV, "--out", str(out)]


@pytest.mark.parametrize(
    ("factors", "how"),
    [
        ((1.5, 1.5), "FAIL: outside 1% of the baseline"),
        # gap +4%, 2x spread 17%: the seeds cannot tell, which is no demonstrated pass
        ((1.10, 0.98), "INCONCLUSIVE: above 1% but within 2x the seed spread"),
    ],
)
def test_fail_on_miss_exits_3_naming_the_recipes_that_missed(
    image_study, tmp_path, capsys, factors, how
):
    argv = _with_losses(image_study, tmp_path, factors)
    assert main([*argv, "--target", "bf16-mixed=1"]) == 0  # without the flag: 0, as before
    assert f"bf16-mixed: {how}" in capsys.readouterr().out
    assert main([*argv, "--target", "bf16-mixed=1", "--fail-on-miss"]) == 3
    captured = capsys.readouterr()
    assert "report:" in captured.out  # the report is written and named first
    err = captured.err.strip().splitlines()
    assert err == [
        f"lowbit: --fail-on-miss: not shown to meet the target (exit status 3): bf16-mixed ({how})"
    ]


def test_fail_on_miss_passes_a_study_whose_recipes_meet_their_targets(image_study, tmp_path):
    argv = _with_losses(image_study, tmp_path, (1.0, 1.0))
    assert main([*argv, "--target", "bf16-mixed=1", "--fail-on-miss"]) == 0


def test_fail_on_miss_counts_a_diverged_baseline_as_a_miss(image_study, tmp_path, capsys):
    """Nothing can be judged against a baseline that diverged: the gate does not pass."""
    argv = _with_losses(image_study, tmp_path, (1.0, 1.0))
    path = tmp_path / "img" / "runs" / "fp32" / "seed-0" / "compare.json"
    record = json.loads(path.read_text())
    record.update(final_metrics={}, per_label=None, memory=None, diverged="loss is nan")
    path.write_text(json.dumps(record))
    assert main([*argv, "--fail-on-miss"]) == 3
    err = capsys.readouterr().err
    assert "fp32 (the baseline diverged (non-finite loss) with seed 0" in err
    assert "bf16-mixed (no verdict: the baseline fp32 diverged" in err


def test_fail_on_miss_with_the_baseline_alone_is_refused_before_training(tmp_path, capsys):
    """A gate that judges no recipe passed every time; refused in one line, nothing trained."""
    argv = [*ARGV, "--out", str(tmp_path / "s"), "--fail-on-miss"]
    argv[argv.index("fp32,bf16-mixed")] = "fp32"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--fail-on-miss with only the baseline (fp32) in --recipes judges no recipe" in err
    assert not (tmp_path / "s").exists()


def test_an_indented_line_after_a_repeated_warning_is_not_dropped(capsys):
    """The --jobs filter took any indented line after a warning said before as that warning's
    own: a worker's line of its own that followed was lost. Only the lines the warning had when
    it was said are left out."""
    with warnings_once():
        # one print, as the trainer says its multi-line warning, in two workers
        for _ in range(2):
            print(
                "lowbit: warning: the recipe keeps every layer:\n  kept 2: reason", file=sys.stderr
            )
        print("  an indented line of its own", file=sys.stderr)
        # separate prints too, and a line that starts as the warning's does but is another
        for _ in range(2):
            print("lowbit: warning: once", file=sys.stderr)
            print("  its line", file=sys.stderr)
        print("lowbit: warning: once", file=sys.stderr)
        print("  its line, then more", file=sys.stderr)
        print("  and another", file=sys.stderr)
    assert capsys.readouterr().err.splitlines() == [
        "lowbit: warning: the recipe keeps every layer:",
        "  kept 2: reason",
        "  an indented line of its own",
        "lowbit: warning: once",
        "  its line",
        "  its line, then more",
        "  and another",
    ]
