"""Session 33: figures in the docs come from a command the docs name. The scripts added for them
exist, answer a bad setting in one line, and one (fast) reproduces its figure to the digit."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_benchmark_script_the_docs_name_exists():
    """A figure's command is only worth naming if it can be run."""
    named = {
        (page.name, script)
        for page in PAGES
        for script in re.findall(r"benchmarks/(\w+)\.py", page.read_text())
    }
    missing = [(page, s) for page, s in named if not (ROOT / "benchmarks" / f"{s}.py").is_file()]
    assert named and not missing, missing


def test_state_zero_point_prints_the_figures_docs_memory_quotes(tmp_path, as_script):
    done = as_script("state_zero_point", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    moves = re.findall(r"(\w+) states: largest move (\S+) x lr", done.stdout)
    page = (ROOT / "docs" / "memory.md").read_text()
    quoted = re.search(
        r"moved (\S+) x lr with fp8 states,\s+(\S+) x lr\s+with 8-bit, (\S+) x lr with fp32", page
    )
    assert [float(v) for _, v in moves] == [float(v) for v in quoted.groups()], done.stdout


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("hadamard_sqnr", ["--seeds", "0"], "--seeds must be at least 1"),
        ("hadamard_sqnr", ["--recipes", "fp8-tensorwise"], "fp8-tensorwise transforms no GEMM"),
        ("hadamard_sqnr", ["--recipes", "nosuch"], "unknown recipe 'nosuch'"),
        ("auto_check_cost", ["--recipe", "fp32"], "not an auto recipe"),
        ("auto_check_cost", ["--checks", "0"], "--checks must be at least 1, got 0"),
        ("fp16_attention_sqnr", ["--batches", "0"], "--batches must be at least 1, got 0"),
    ],
)
def test_a_bad_setting_is_one_line_not_a_traceback(name, argv, message, tmp_path, as_script):
    done = as_script(name, *argv, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{name}.py: error: ")
