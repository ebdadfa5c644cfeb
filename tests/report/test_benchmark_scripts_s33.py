"""Session 33's hunt through the benchmark scripts: a parity run of some tasks keeps the others'
recorded results, pages checked before any run, and bad input files or pages one line each."""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

from lowbit.errors import UsageError

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
BEGIN, END = "<!-- parity results: begin -->", "<!-- parity results: end -->"


def _study(heading: str, body: str) -> str:
    """Recorded Parity results: the full study's command, then one part per task."""
    return (
        f"{heading}\n\nthe full study's note\n\n```bash\npython benchmarks/parity.py\n```\n\n"
        "### causal-lm: model nano, 540 steps\n\nrecorded causal-lm results\n\n"
        "### token-classification: model tiny, 200 steps\n\nrecorded token results\n\n"
        "### image-classification: model tiny, 200 steps\n\nrecorded image results\n\n"
        "### A note on the study\n\nwritten by hand\n" + body
    )


RECORDED = _study("## Parity (benchmarks/parity.py)", "\n## Next\n\nkept\n")
DOC = f"# Parity\n\n{BEGIN}\n" + _study("### Measured", "") + f"{END}\n\n## After\n\nkept\n"
QUICK = ["--tasks", "image-classification", "--recipes", "fp32", "--seeds", "1"]
QUICK += ["--img-steps", "1", "--jobs", "1", "--quiet", "--note", "a quick rerun"]


def test_a_run_of_one_task_keeps_the_other_tasks_results(parity, pages, tmp_path):
    """`--tasks image-classification` rewrote the whole Parity section of both pages: the causal-LM
    and token-classification results of the full study were gone."""
    assert parity.main([*QUICK, "--out", str(tmp_path / "out")]) == 0
    for page in (pages / "BENCHMARKS.md", pages / "docs" / "parity.md"):
        text = page.read_text()
        assert "recorded image results" not in text, page
        kept = ["the full study's note", "recorded causal-lm results", "recorded token results"]
        kept += ["### A note on the study\n\nwritten by hand\n", "kept\n"]
        assert all(line in text for line in kept), page
        assert text.count("### image-classification: ") == 1, page
        ran = text.index("### image-classification: model tiny, 1 steps, batch 32, seeds 0")
        assert text.index("recorded token results") < ran < text.index("### A note on the study")
        # the rerun names its own command, not the full study's above it
        assert "Rerun of this task alone: a quick rerun" in text[ran:]
        assert "--tasks image-classification" in text[ran:]
    doc = (pages / "docs" / "parity.md").read_text()
    assert doc.count(BEGIN) == doc.count(END) == 1 and doc.endswith(f"{END}\n\n## After\n\nkept\n")


@pytest.mark.parametrize(
    ("doc", "message", "fix"),
    [
        (DOC.replace(END, ""), f"no line '{END}' around its results", True),
        (DOC.replace(BEGIN, ""), f"no line '{BEGIN}' around its results", False),
        (DOC.replace(BEGIN, "@").replace(END, BEGIN).replace("@", END), "stands above", False),
        (None, "parity.md: no such file", True),
    ],
)
def test_a_doc_without_its_markers_is_refused_before_any_run(
    doc, message, fix, parity, pages, tmp_path, capsys
):
    """docs/parity.md without its markers: a traceback after the study, with BENCHMARKS.md already
    written (half a result). The fix, --no-write, reads neither page (whatever the markers): a
    doc with its markers wrong and one missing run it (a study each)."""
    page = pages / "docs" / "parity.md"
    page.unlink() if doc is None else page.write_text(doc)
    with pytest.raises(SystemExit) as stopped:
        parity.main([*QUICK, "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(page) in error and message in error and error.endswith("or run with --no-write")
    assert (pages / "BENCHMARKS.md").read_text() == RECORDED
    assert not (tmp_path / "out").exists()
    if fix:
        assert parity.main([*QUICK, "--no-write", "--out", str(tmp_path / "out")]) == 0


@pytest.fixture
def optimizer_states(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        "optimizer_states_s33", BENCHMARKS / "optimizer_states.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_from_json_of_a_missing_file_is_one_line(tmp_path, as_script):
    """`optimizer_states.py --from-json missing.json` was a FileNotFoundError traceback."""
    done = as_script("optimizer_states", "--from-json", "gone.json", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "optimizer_states.py: error: --from-json gone.json: No such file or directory; "
        "fix: a file written by --json"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not JSON (Expecting property name"),
        ('{"rows": []}', "no 'settings' and 'rows' of runs"),
        ("[1, 2]", "no 'settings' and 'rows' of runs"),
        (b"\xff\xfe", "not text"),
    ],
)
def test_from_json_of_another_file_is_one_line(content, message, optimizer_states, tmp_path):
    """A corrupt or foreign --from-json file: JSONDecodeError, KeyError or IndexError."""
    path = tmp_path / "rows.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError, match="fix: a file written by --json") as error:
        optimizer_states.main(["--from-json", str(path)])
    assert f"--from-json {path}: {message}" in str(error.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),  # IndexError
        (["--steps", "0"], "--steps must be at least 1, got 0"),  # IndexError
        (["--threads", "0"], "--threads must be at least 1, got 0"),  # RuntimeError
        (["--state-error", "0"], "--state-error must be a step from 1 to --steps (300)"),
        (["--state-error", "301"], "--state-error must be a step from 1 to --steps (300)"),
        (["--states", "nosuch"], "argument --states: invalid choice: 'nosuch'"),  # after fp32 ran
        (["--json", "no/such/folder/rows.json"], "cannot write into"),  # after the first run
    ],
)
def test_optimizer_states_refuses_bad_values_before_any_run(
    argv, message, optimizer_states, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(optimizer_states, "run", lambda *args: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as stopped:
        optimizer_states.main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_one_step_measures_the_optimizer_states(optimizer_states, tmp_path, capsys):
    """The states were measured before the last step: with --steps 1, before any, so 0 bytes."""
    rows = tmp_path / "rows.json"
    argv = ["--steps", "1", "--batch", "2", "--seq", "16", "--states", "fp32", "--json", str(rows)]
    optimizer_states.main(argv)
    (row,) = json.loads(rows.read_text())["rows"]
    assert row["state_bytes"] > 0 and row["bytes_per_param"] == pytest.approx(8, rel=0.01)


def test_a_page_that_cannot_be_written_is_one_line_after_the_results(
    tmp_path, monkeypatch, as_script
):
    """`--write` into a page that cannot be written (a read-only checkout) was a traceback after
    the whole benchmark ran; the scripts without `run_script` let any refusal out as one too."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    page = tmp_path / "BENCHMARKS.md"
    page.mkdir()  # unwritable to root too
    monkeypatch.setattr(importlib.import_module("benchmarks_md"), "BENCHMARKS_MD", page)
    argv = ["--write", "--rounds", "1", "--batch", "1", "--heads", "1", "--seq", "8"]
    done = as_script("attention", *argv, "--head-dim", "8", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "| fp16 via lowbit" in done.stdout  # the results, printed before the refusal
    assert done.stderr.strip() == (
        f"attention.py: error: {page} not updated (Is a directory); the results are printed "
        "above; fix: make the page writable and run again, or leave out --write"
    )


def test_stats_overhead_refuses_a_page_it_cannot_write_in_one_line(
    tmp_path, monkeypatch, as_script
):
    """A page it cannot write (a read-only checkout): one line after the results, not a
    traceback."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    page = tmp_path / "BENCHMARKS.md"
    page.mkdir()  # unwritable to root too
    monkeypatch.setattr(importlib.import_module("benchmarks_md"), "BENCHMARKS_MD", page)
    argv = ["--interval", "1", "--intervals", "1", "--batch-size", "1", "--seq-len", "8"]
    done = as_script("stats_overhead", *argv, "--write", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "| one observed step (1 measured) |" in done.stdout  # the results, printed first
    assert done.stderr.strip().splitlines()[-1] == (
        f"stats_overhead.py: error: {page} not updated (Is a directory); the results are printed "
        "above; fix: make the page writable and run again, or leave out --write"
    )


@pytest.mark.parametrize("argv", [["--interval", "0"], ["--intervals", "0"]])
def test_stats_overhead_refuses_no_measured_step_in_one_line(argv, tmp_path, as_script):
    """`--interval 0` or `--intervals 0` timed no step: `StatisticsError` after the warm-up."""
    done = as_script("stats_overhead", *argv, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"stats_overhead.py: error: {argv[0]} must be at least 1, got 0"
    )


def test_a_full_disk_as_the_pages_are_written_is_one_line(
    parity, pages, tmp_path, capsys, monkeypatch
):
    """The study has run and its reports are saved; a page write that fails ended in a traceback."""

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(parity, "write_atomically", full_disk)
    assert parity.main([*QUICK, "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("parity.py: error: BENCHMARKS.md and docs/parity.md not both updated")
    assert "(No space left on device)" in error and str(tmp_path / "out") in error
    assert (pages / "BENCHMARKS.md").read_text() == RECORDED
