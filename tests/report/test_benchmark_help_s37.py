"""Session 37's new user at the benchmark scripts: every script in benchmarks/ answers --help with
what it measures and refuses a flag it does not take, and a table names only the default setting
as the default."""

import ast
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from lowbit.train.tasks import Task

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


@pytest.mark.parametrize(
    ("name", "help_text"),
    [
        ("quantize", "--repeats REPEATS timed calls per row (default 7; 3 with --quick)"),
        ("inference", "--max-batches MAX_BATCHES validation batches; 0: every batch, as in lowbit"),
        ("parity", "--task-seeds TASK_SEEDS seeds of the classification tasks (default: --seeds)"),
    ],
)
def test_help_names_a_default_that_depends_on_another_flag(name, help_text, tmp_path, as_script):
    """quantize's --repeats said "(7)", its --quick run using 3; inference's --max-batches 0,
    every batch as in `lowbit eval`, was not said; parity's --task-seeds named no default."""
    done = as_script(name, "--help", cwd=tmp_path)
    assert help_text in " ".join(done.stdout.split()), done.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_refuses_a_flag_it_does_not_take(name, tmp_path, as_script):
    """state_zero_point.py ignored any flag and ran; benchmarks_md.py exited 0 having done
    nothing."""
    argv = ["--run", "x"] if name == "inference" else []  # its one required flag first
    done = as_script(name, *argv, "--no-such-flag", cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:]
    # one line, as `lowbit` refuses a flag (session 42; argparse's usage block before)
    assert (
        done.stderr
        == f"{name}.py: error: --no-such-flag: unrecognized argument; fix: see {name}.py --help\n"
    )


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


class Windows(Task):
    """A causal-LM task whose validation split holds ``windows`` windows: `Task`'s own count of
    the batches an evaluation runs, without a corpus or a model."""

    def __init__(self, config, windows: int):
        super().__init__(config)
        self.windows = windows

    def eval_rows(self, split: str) -> int:
        return self.windows


def _inference_table(monkeypatch, argv, max_batches, windows=41, batch_size=16, seq_len=256):
    """inference.py's section for a run of ``batch_size`` x ``seq_len`` whose validation split
    holds ``windows`` windows, run as ``argv`` with ``--max-batches max_batches``."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("inference_s37", BENCHMARKS / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr("sys.argv", [str(BENCHMARKS / "inference.py"), *argv])
    config = SimpleNamespace(
        model="nano",
        recipe="fp8-tensorwise",
        data="my.txt",
        tokenizer="bpe",
        batch_size=batch_size,
        seq_len=seq_len,
    )
    source = SimpleNamespace(config=config, step=7, task=Windows(config, windows))
    row = {"label": "fp32 (reference)", "bytes": 1e6, "ppl": 10.0, "kernel": "fp32", "tokens": 64}
    args = SimpleNamespace(run="runs/x", max_batches=max_batches, rounds=1, threads=None)
    return module.table(source, [row], {}, args)


def test_inference_writes_the_run_and_the_command_it_was_given(monkeypatch):
    """Every run was "the default `lowbit train`: tiny Llama ... on stdlib bytes", and the command
    written was `--write` without the --quick or --no-speed it ran with (a reader re-running it
    got another table)."""
    argv = ["--run", "runs/x", "--quick", "--no-speed"]
    text = _inference_table(monkeypatch, argv, max_batches=1)
    assert "default `lowbit train`" not in text and "--write" not in text
    assert "model nano, fp8-tensorwise, 7 steps on my.txt bpe tokens" in text
    assert "Command: `python benchmarks/inference.py --run runs/x --quick --no-speed`" in text


@pytest.mark.parametrize(
    ("max_batches", "written"),
    [
        (0, "(21 batches of 2 x 16)"),  # 0: every batch, as in `lowbit eval`; 41 windows by 2
        (8, "(8 batches of 2 x 16)"),
        (1, "(1 batch of 2 x 16)"),
        (50, "(21 batches of 2 x 16)"),  # fewer in the split than asked for
    ],
)
def test_inference_writes_the_batches_it_evaluated_of_the_runs_shape(
    max_batches, written, monkeypatch
):
    """Every run's validation was written "(N batches of 16 x 256)", the evaluation being of the
    run's own --batch-size and --seq-len, and --max-batches 0 (every batch) "0 batches"."""
    argv = ["--run", "runs/x", "--max-batches", str(max_batches)]
    text = _inference_table(monkeypatch, argv, max_batches, windows=41, batch_size=2, seq_len=16)
    assert f"Validation: 64 tokens {written}." in text, text


# a parity.py study that, refused or not, trains little and writes no page of the repository
PARITY_QUICK = ["--tasks", "image-classification", "--no-write", "--out", "study"]


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("gemm", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
        ("gemm", ["--budget", "0"], "--budget must be above 0, got 0.0"),
        ("attention", ["--head-dim", "0"], "--head-dim must be at least 1, got 0"),
        ("quantize", ["--mib", "0"], "--mib must be at least 1, got 0"),
        ("quantize", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
        ("ops_per_step", ["--batch", "0"], "--batch must be at least 1, got 0"),
        ("ops_per_step", ["--seq", "-3"], "--seq must be at least 1, got -3"),
        ("doctor_outliers", ["--steps", "0"], "--steps must be at least 1, got 0"),
        ("doctor_outliers", ["--probe-steps", "0"], "--probe-steps must be at least 1, got 0"),
        ("trainer_overhead", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ("trainer_overhead", ["--warmup", "0"], "--warmup must be at least 1, got 0"),
        ("trainer_overhead", ["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
        ("auto_check_cost", ["--threads", "0"], "--threads must be at least 1, got 0"),
        ("fp16_attention_sqnr", ["--batches", "0"], "--batches must be at least 1, got 0"),
        ("hadamard_sqnr", ["--seeds", "0"], "--seeds must be at least 1, got 0"),
        ("activation_ratios", ["--seq", "0"], "--seq must be at least 1, got 0"),
        # recipe_speed.py: --batch 0 was a worker process's traceback after ~30 s; the others
        # were taken as they came (no warm-up, no step profiled)
        ("recipe_speed", ["--batch", "0"], "--batch must be at least 1, got 0"),
        ("recipe_speed", ["--seq", "0"], "--seq must be at least 1, got 0"),
        ("recipe_speed", ["--warmup", "-1"], "--warmup must be at least 0, got -1"),
        (
            "recipe_speed",
            ["--profile", "fp32", "--profile-steps", "0"],
            "--profile-steps must be at least 1, got 0",
        ),
        # inference.py: --rounds 0 was a StatisticsError after the whole quality pass, and
        # --threads 0 all threads; refused before the run is read (a folder that is none here)
        ("inference", ["--run", "nosuch", "--rounds", "0"], "--rounds must be at least 1, got 0"),
        ("inference", ["--run", "nosuch", "--threads", "0"], "--threads must be at least 1, got 0"),
        (
            "inference",
            ["--run", "nosuch", "--max-batches", "-1"],
            "--max-batches -1 is negative; fix: use 1 or more, or 0 for every batch",
        ),
        # parity.py: --task-seeds 0 was taken for --seeds, --img-steps 0 refused as "steps"
        (
            "parity",
            ["--task-seeds", "0", *PARITY_QUICK],
            "--task-seeds must be at least 1, got 0",
        ),
        ("parity", ["--img-steps", "0", *PARITY_QUICK], "--img-steps must be at least 1, got 0"),
    ],
)
def test_a_refusal_names_the_flag_and_its_value(name, argv, message, tmp_path, as_script):
    """A refusal named every flag of its check ("--rounds must be at least 1 and --budget above
    0" for --rounds 0; attention's listed five), not the one given, nor its value. Each is
    refused before any work: gemm's --rounds 0 timed forever, quantize's --mib 0 timed empty
    tensors (0.00 GB/s) and --repeats 0 was taken for the default, ops_per_step's --batch 0 was a
    reshape traceback, and doctor_outliers' --steps 0 and trainer_overhead's --batch-size 0 were
    refused by names they do not take (eval_interval, batch_size)."""
    done = as_script(name, *argv, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"{name}.py: error: {message}"
