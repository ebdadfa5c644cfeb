"""Session 32's hunt through the benchmark scripts: pages written whole, and every script's command
line answering --help and bad arguments in one line."""

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RECORDED = "## Parity (benchmarks/parity.py)\n\nthe recorded 3-seed study\n\n## Next\n\nkept\n"
DOC = (
    "# Parity\n\n<!-- parity results: begin -->\nthe recorded study\n<!-- parity results: end -->\n"
)
QUICK = ["--tasks", "image-classification", "--recipes", "fp32", "--seeds", "1"]
QUICK += ["--img-steps", "1", "--jobs", "1", "--quiet"]


def test_parity_replaces_the_recorded_results_whole(parity, pages, tmp_path):
    """The study's results replace the recorded ones (as issue 6 asks), written whole."""
    assert parity.main([*QUICK, "--out", str(tmp_path / "out")]) == 0
    page = (pages / "BENCHMARKS.md").read_text()
    assert "the recorded 3-seed study" not in page and "## Next\n\nkept\n" in page
    assert "### image-classification: model tiny, 1 steps" in page
    doc = (pages / "docs" / "parity.md").read_text()
    assert "the recorded study" not in doc and "### Measured" in doc


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_s32", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interrupted_writes(monkeypatch):
    """Every `Path.write_text` stops halfway through with a Ctrl-C."""

    def write_half(path, text, *args, **kwargs):
        with open(path, "w", encoding="utf-8") as file:
            file.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", write_half)


@pytest.mark.parametrize("writer", ["benchmarks_md", "parity", "parity_doc"])
def test_a_page_interrupted_while_written_keeps_what_it_held(writer, parity, tmp_path, monkeypatch):
    """`--write` put BENCHMARKS.md straight over itself: a Ctrl-C then left the page truncated,
    every other benchmark's section lost."""
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(RECORDED if writer != "parity_doc" else DOC)
    before = page.read_text()
    _interrupted_writes(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        if writer == "benchmarks_md":
            _load("benchmarks_md").write_section("## Next", "new figures " * 1000, path=page)
        elif writer == "parity":
            parity.replace_section(page, parity.SECTION + "\n\nnew " * 1000)
        else:
            parity.replace_doc_results(page, "new " * 1000)
    assert page.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]


@pytest.mark.parametrize("name", ["distributed_comm", "fsdp_16bit"])
def test_the_two_rank_benchmarks_answer_help(name, tmp_path, as_script):
    """Their arguments were read from sys.argv as runs: `--help` spawned two ranks that each
    failed with a traceback."""
    done = as_script(name, "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("name", "arg", "message"),
    [
        ("distributed_comm", "ddp-fp32", "'ddp-fp32' is not strategy:recipe; fix: ddp or fsdp"),
        ("distributed_comm", "fsdp:bf16", "'fsdp:bf16' is not strategy:recipe"),
        ("fsdp_16bit", "bf16", "unknown recipe(s) bf16; valid: fp32"),
    ],
)
def test_the_two_rank_benchmarks_refuse_a_bad_run_in_one_line(
    name, arg, message, tmp_path, as_script
):
    done = as_script(name, arg, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--profile", "nosuch"], "--profile: unknown recipe nosuch; see `lowbit recipes`"),
        (["--profile", "fp32", "--device", "cuda:7"], "--device cuda:7: no CUDA device here"),
    ],
)
def test_recipe_speed_profile_refuses_bad_settings_in_one_line(argv, message, tmp_path, as_script):
    """--profile built its run before any check: an unknown recipe was a traceback."""
    if "--device" in argv and __import__("torch").cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    done = as_script("recipe_speed", *argv, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_recipe_speed_runs_tiny_from_another_folder(tmp_path, as_script):
    """The smallest run it allows: one process, one round; a table of fp32 and the recipe, the
    ratio against the fp32 of the same process; BENCHMARKS.md untouched. (The script is run in
    this process, from ``tmp_path``; the process it times the recipes in is still its own.)"""
    page = (BENCHMARKS.parent / "BENCHMARKS.md").read_text()
    argv = ["--recipes", "bf16-mixed", "--rounds", "1", "--warmup", "0", "--processes", "1"]
    done = as_script("recipe_speed", *argv, "--batch", "2", "--seq", "16", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| recipe | step time (ms) | ratio to fp32 |"
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| fp32", "| bf16-mixed"]
    assert rows[1].endswith("| 1.00 |")
    assert (BENCHMARKS.parent / "BENCHMARKS.md").read_text() == page


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("ops_per_step", ["--recipes", "nosuch"], "unknown recipe 'nosuch'"),
        ("stats_overhead", ["--recipe", "nosuch"], "unknown recipe 'nosuch'"),
        ("trainer_overhead", ["--recipe", "nosuch"], "unknown recipe 'nosuch'"),
        ("doctor_outliers", ["--recipe", "nosuch"], "unknown recipe 'nosuch'"),
        ("optimizer_states", ["--recipe", "nosuch", "--steps", "1", "--seeds", "1"], "'nosuch'"),
        ("inference", ["--run", "no-such-run"], "no-such-run: no such folder; fix:"),
        ("attention", ["--rounds", "0"], "--rounds must be at least 1"),
        (
            "trainer_overhead",
            ["--steps", "1", "--warmup", "0", "--batch-size", "1", "--seq-len", "8", "--quiet"],
            "--warmup must be at least 1, got 0",
        ),
    ],
)
def test_a_bad_setting_is_one_line_not_a_traceback(name, argv, message, tmp_path, as_script):
    """lowbit's UsageError (an unknown --recipe) reached the user as a traceback, and attention's
    --rounds 0 as `StatisticsError: no median for empty data`."""
    done = as_script(name, *argv, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{name}.py: error: ")


def test_activation_ratios_measures_what_the_estimate_counts():
    """benchmarks/activation_ratios.py, whose figures docs/memory.md quotes: bf16-mixed's estimate
    equals its measured activations to the byte on the CPU, fp8-tensorwise's falls short by the
    bf16 carriers the emulation keeps."""
    ratios = _load("activation_ratios").ratios
    est, got, _, _ = ratios("nano", "bf16-mixed", 1, 8)
    assert est == got > 0
    est, got, _, _ = ratios("nano", "fp8-tensorwise", 1, 8)
    assert 0 < est < got
