"""Session 37's new user at the benchmark scripts: every script in benchmarks/ answers --help with
what it measures and refuses a flag it does not take, and a table names only the default setting
as the default."""

import ast
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py"))


def _first_paragraph(name: str) -> str:
    """The script's docstring up to its first blank line, its whitespace collapsed."""
    doc = ast.get_docstring(ast.parse((BENCHMARKS / f"{name}.py").read_text()))
    return " ".join(doc.split("\n\n")[0].split())


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help_with_what_it_measures(name, tmp_path, as_script):
    """state_zero_point.py ran its benchmark for --help, benchmarks_md.py printed nothing, and
    fp16_attention_sqnr.py's description stopped mid-sentence ("with lowbit's rerouted CPU")."""
    done = as_script(name, "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stdout[-2000:]
    assert _first_paragraph(name) in " ".join(done.stdout.split())


@pytest.mark.parametrize(
    ("name", "flag", "default"),
    [
        ("attention", "--rounds", "15"),
        ("gemm", "--rounds", "15"),
        ("trainer_overhead", "--warmup", "5"),
        ("doctor_outliers", "--steps", "150"),
        ("stats_overhead", "--intervals", "2"),
        ("recipe_speed", "--processes", "3"),
        ("quantize", "--mib", "64"),
        ("parity", "--seeds", "3"),
    ],
)
def test_help_names_the_defaults(name, flag, default, tmp_path, as_script):
    """Most flags had no help: a user looking for the smallest settings of a quick run could not
    tell what a flag left out would be."""
    done = as_script(name, "--help", cwd=tmp_path)
    text = " ".join(done.stdout.split())
    assert re.search(rf"{flag} \S+ [^-]*\(?default {default}\b", text), text


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_refuses_a_flag_it_does_not_take(name, tmp_path, as_script):
    """state_zero_point.py ignored any flag and ran; benchmarks_md.py exited 0 having done
    nothing."""
    argv = ["--run", "x"] if name == "inference" else []  # its one required flag first
    done = as_script(name, *argv, "--no-such-flag", cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"{name}.py: error: unrecognized arguments: --no-such-flag"


def test_benchmarks_md_run_by_hand_says_it_is_no_benchmark(tmp_path, as_script):
    done = as_script("benchmarks_md", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        "benchmarks_md.py: error: a module the benchmark scripts import, not a benchmark; fix: "
        "run one of the other scripts in benchmarks/ (each has --help)"
    )


@pytest.mark.parametrize("interval", [1, None])
def test_stats_overhead_calls_only_the_default_interval_the_default(interval, monkeypatch):
    """`--interval 1` was printed as "every 1 steps (default)"."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its `from benchmarks_md import ...`
    path = BENCHMARKS / "stats_overhead.py"
    spec = importlib.util.spec_from_file_location("stats_overhead_s37", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    interval = interval or module.DEFAULT_INTERVAL
    monkeypatch.setattr("sys.argv", ["stats_overhead.py", "--interval", str(interval)])
    args = SimpleNamespace(
        recipe="fp8-tensorwise", batch_size=2, seq_len=16, intervals=1, interval=interval
    )
    result = {"plain": 0.1, "on": 0.2, "overhead": 1.0, "observed_steps": 1, "observed_ratio": 2.0}
    text = module.table(args, result)
    row = next(line for line in text.splitlines() if line.startswith(f"| every {interval} steps"))
    assert ("(default)" in row) == (interval == module.DEFAULT_INTERVAL)


def test_inference_writes_the_run_and_the_command_it_was_given(monkeypatch):
    """Every run was "the default `lowbit train`: tiny Llama ... on stdlib bytes", and the command
    written was `--write` without the --quick or --no-speed it ran with (a reader re-running it
    got another table)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("inference_s37", BENCHMARKS / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--run", "runs/x", "--quick", "--no-speed"]
    monkeypatch.setattr("sys.argv", [str(BENCHMARKS / "inference.py"), *argv])
    config = SimpleNamespace(model="nano", recipe="fp8-tensorwise", data="my.txt", tokenizer="bpe")
    row = {"label": "fp32 (reference)", "bytes": 1e6, "ppl": 10.0, "kernel": "fp32", "tokens": 64}
    args = SimpleNamespace(run="runs/x", max_batches=1, rounds=1, threads=None)
    text = module.table(SimpleNamespace(config=config, step=7), [row], {}, args)
    assert "default `lowbit train`" not in text and "--write" not in text
    assert "model nano, fp8-tensorwise, 7 steps on my.txt bpe tokens" in text
    assert "Command: `python benchmarks/inference.py --run runs/x --quick --no-speed`" in text


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("gemm", ["--rounds", "0"], "--rounds must be at least 1 and --budget above 0"),
        ("quantize", ["--mib", "0"], "--mib and --repeats must be at least 1"),
        ("quantize", ["--repeats", "0"], "--mib and --repeats must be at least 1"),
        ("ops_per_step", ["--batch", "0"], "--batch and --seq must be at least 1"),
        ("doctor_outliers", ["--steps", "0"], "--steps, --batch-size, --seq-len and --probe-steps"),
        (
            "trainer_overhead",
            ["--batch-size", "0"],
            "--batch-size and --seq-len must be at least 1",
        ),
    ],
)
def test_a_setting_below_one_is_refused_in_one_line(name, argv, message, tmp_path, as_script):
    """gemm's --rounds 0 timed forever, quantize's --mib 0 timed empty tensors (0.00 GB/s) and
    --repeats 0 was taken for the default, ops_per_step's --batch 0 was a reshape traceback, and
    doctor_outliers' --steps 0 and trainer_overhead's --batch-size 0 were refused by names they do
    not take (eval_interval, batch_size)."""
    done = as_script(name, *argv, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{name}.py: error: ") and message in last
