"""`benchmarks/parity.py`'s command line: bad names fail at once with one line, nothing run."""

import pytest


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "causal_lm"], "unknown task 'causal_lm'; valid: causal-lm"),
        (["--recipes", "fp32,nosuch"], "unknown recipe 'nosuch'; valid: fp32"),
        (["--task-recipes", "bf16"], "unknown recipe 'bf16'"),
    ],
)
def test_bad_names_are_one_line_errors(argv, message, tmp_path, as_script):
    done = as_script("parity", *argv, "--no-write", "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr and not any(tmp_path.iterdir())


def test_the_recorded_command_reads_back_as_the_arguments_given(parity):
    """The command written above the results joined the arguments with spaces: a --note of
    several words (docs/parity.md's session-15 note) came back as stray arguments."""
    import shlex

    argv = ["--out", "/work/parity s15", "--note", "Session 15: PyTorch's kernels, anew", "--quiet"]
    command = parity.recorded_command(argv)
    assert shlex.split(command) == ["python", "benchmarks/parity.py", *argv]
