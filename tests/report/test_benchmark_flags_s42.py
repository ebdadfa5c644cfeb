"""Session 42: the benchmark scripts take a flag only as spelt in full, as `lowbit` does.

Before: their argparse parsers took any unique prefix, so ``gemm.py --round 3`` ran as
``--rounds 3`` (and a prefix unique today turns ambiguous, breaking a saved command, the day a
flag is added). Each script's parser now refuses it in lowbit's one line (`lowbit.cli`'s
`parse_in_full`, shared through benchmarks_md.ScriptParser), naming the flag meant.
"""

import pytest

from tests.report.test_benchmark_help_s37 import SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_refuses_a_shortened_flag_in_one_line(name, tmp_path, as_script):
    """``--hel``, the one flag every script takes, shortened: it printed the help, exit 0."""
    done = as_script(name, "--hel", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stdout[-2000:]
    assert done.stderr == (
        f"{name}.py: error: --hel: unrecognized argument (a flag is taken only in full); "
        "fix: did you mean '--help' (show this help message and exit)?\n"
    )


@pytest.mark.parametrize(
    ("name", "argv", "meant"),
    [
        ("gemm", ["--round", "3"], "'--rounds'"),
        ("inference", ["--run", "x", "--max-batch", "2"], "'--max-batches' (validation batches)"),
    ],
)
def test_a_shortened_flag_with_a_value_is_refused_before_anything_runs(
    name, argv, meant, tmp_path, as_script
):
    """``--help`` after it: taken as its prefix, the shortened flag let the help print (exit 0),
    where the script would otherwise have run its benchmark."""
    done = as_script(name, *argv, "--help", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stdout[-2000:]
    shortened = argv[-2]
    assert done.stderr == (
        f"{name}.py: error: {shortened}: unrecognized argument (a flag is taken only in full); "
        f"fix: did you mean {meant}?\n"
    )
