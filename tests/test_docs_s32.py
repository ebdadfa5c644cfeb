"""The docs against the code (session 32): what tests/test_docs_s26.py checks of `lowbit COMMAND
--flag` lines, for the flags the pages name elsewhere (prose, `eval --max-batches N`, benchmark
command lines), the defaults they state, the tour's coverage of the commands, and a measured table
that a command prints."""

import argparse
import re
from pathlib import Path

import torch

from lowbit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = r"(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9])"

# Flags of the other tools the pages quote (torchrun, TensorBoard, ruff, pytest), not lowbit's.
EXTERNAL_FLAGS = {
    "--nnodes",
    "--nproc-per-node",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--shutdown-timeout",
    "--logdir",
    "--check",
    "--durations",
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _script_flags() -> dict[str, set[str]]:
    """Each benchmark script's flags, read from its `add_argument` calls (the scripts run work
    when imported, so their parsers are not built here)."""
    return {
        path.name: set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", path.read_text()))
        for path in (ROOT / "benchmarks").glob("*.py")
    }


def _line(text: str, offset: int) -> int:
    return text[:offset].count("\n") + 1


def _unknown_flags(page: str, text: str) -> list[str]:
    """Flags a page names anywhere, prose included, that no lowbit command, benchmark script or
    quoted tool takes: a flag renamed in the code and left in a sentence ("`--checkpoint` picks
    another") is as wrong for a reader as one in a quoted command line."""
    known = set().union(*map(_options, _commands().values()), *_script_flags().values())
    known |= EXTERNAL_FLAGS
    return [
        f"{page}:{_line(text, match.start())}: {match[1]}"
        for match in re.finditer(FLAG, text)
        if match[1] not in known
    ]


def test_every_flag_the_docs_name_is_one_that_something_takes():
    unknown = [u for page in PAGES for u in _unknown_flags(page.name, page.read_text())]
    assert not unknown, "flags the docs name that nothing takes:\n" + "\n".join(unknown)


def _stale_short_commands(page: str, text: str) -> list[str]:
    """`eval --max-batches N` (a command quoted without `lowbit` in front): its flags are that
    command's."""
    commands = _commands()
    names = "|".join(commands)
    stale = []
    for match in re.finditer(rf"`({names}) (--[^`]*)`", text):
        for flag in re.findall(FLAG, match[2]):
            if flag not in _options(commands[match[1]]):
                stale.append(f"{page}:{_line(text, match.start())}: {match[1]} {flag}")
    return stale


def test_every_flag_of_a_command_quoted_without_lowbit_is_that_commands():
    stale = [s for page in PAGES for s in _stale_short_commands(page.name, page.read_text())]
    assert not stale, "flags the docs give a command that it does not take:\n" + "\n".join(stale)


def _stale_benchmark_flags(page: str, text: str) -> list[str]:
    """`benchmarks/SCRIPT.py --flag ...` on one line (up to a closing backtick): the flags are
    the script's, so the command a figure names can be run again."""
    scripts = _script_flags()
    stale = []
    for match in re.finditer(r"benchmarks/(\w+\.py)([^`\n]*)", text):
        if match[1] not in scripts:
            continue  # a missing script is tests/test_docs_s30.py's to report
        for flag in re.findall(FLAG, match[2]):
            if flag not in scripts[match[1]]:
                stale.append(f"{page}:{_line(text, match.start())}: {match[1]} {flag}")
    return stale


def test_every_benchmark_command_line_uses_flags_its_script_takes():
    stale = [s for page in PAGES for s in _stale_benchmark_flags(page.name, page.read_text())]
    assert not stale, "benchmark flags the docs quote that the script lacks:\n" + "\n".join(stale)


def test_the_flag_checks_catch_a_wrong_flag():
    """The checks above are no tautologies: a flag the code does not have fails each of them."""
    text = (
        "`eval --max-batch N` picks ... `--checkpoints 200`\n"
        "(`python benchmarks/recipe_speed.py --rounds 9 --process 5`)\n"
    )
    assert _unknown_flags("scratch.md", text) == [
        "scratch.md:1: --max-batch",
        "scratch.md:1: --checkpoints",
        "scratch.md:2: --process",
    ]
    assert _stale_short_commands("scratch.md", text) == ["scratch.md:1: eval --max-batch"]
    # --max-batches is a lowbit flag, so only the per-command check sees it given to `formats`
    assert _stale_short_commands("scratch.md", "`formats --max-batches 2`") == [
        "scratch.md:1: formats --max-batches"
    ]
    assert _stale_benchmark_flags("scratch.md", text) == ["scratch.md:2: recipe_speed.py --process"]


def test_the_readme_tour_runs_every_command():
    """A command added to `lowbit --help` without a `$ lowbit COMMAND` line in the README's tour
    is one a new user does not find."""
    readme = (ROOT / "README.md").read_text()
    shown = set(re.findall(r"^\s*\$ (?:\w+=\S+ )*lowbit (\w+)", readme, re.M))
    assert set(_commands()) <= shown, f"commands the tour never runs: {set(_commands()) - shown}"


def _stated(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _wrong_defaults(page: str, text: str) -> list[str]:
    """`--flag ... (default N)` with a number N: the default of a lowbit command taking that flag
    (or, where the parser leaves it None to resolve later, the one its help states)."""
    commands = _commands()
    wrong = []
    for match in re.finditer(rf"{FLAG}[^.;\n]{{0,40}}?\(default:? (-?[\d.]+)\)", text):
        flag, stated = match[1], float(match[2])
        actions = [
            action
            for parser in commands.values()
            for action in parser._actions
            if flag in action.option_strings
        ]
        if not actions:
            continue  # another tool's flag (torchrun's --shutdown-timeout)
        agree = any(
            (isinstance(a.default, (int, float)) and a.default == stated)
            or re.search(rf"default:? {re.escape(_stated(stated))}\b", a.help or "")
            for a in actions
        )
        if not agree:
            wrong.append(f"{page}:{_line(text, match.start())}: {flag} (default {match[2]})")
    return wrong


def test_every_default_the_docs_state_is_the_commands():
    wrong = [w for page in PAGES for w in _wrong_defaults(page.name, page.read_text())]
    assert not wrong, "defaults the docs state that the code does not have:\n" + "\n".join(wrong)


def test_the_default_check_catches_a_changed_default():
    text = "prints the `--top` rows of the table (default 20) and `--seeds` (default 3)\n"
    assert _wrong_defaults("scratch.md", text) == ["scratch.md:1: --top (default 20)"]


def test_every_option_says_its_default_in_its_help():
    """`--help` is where the docs' defaults are checked by a reader: an option with a default
    states it (`(default 15)`, or `fp32 (default), ...`); `--top` and `--max-new-tokens` did not."""
    silent = []
    for name, parser in _commands().items():
        for action in parser._actions:
            default = action.default
            if not action.option_strings or action.help in (None, argparse.SUPPRESS):
                continue
            if default is None or isinstance(default, bool) or default == argparse.SUPPRESS:
                continue
            value = re.escape(_stated(default))
            help_text = " ".join(action.help.split())
            if not re.search(rf"default:? [^;)]*?\b{value}\b|\b{value} \(default\)", help_text):
                silent.append(f"lowbit {name} {action.option_strings[0]}: {default!r}")
    assert not silent, "options whose help does not state their default:\n" + "\n".join(silent)


def _sqnr_table(text: str) -> dict[str, tuple[str, str]]:
    """The measured rows of docs/formats.md's SQNR table by `lowbit formats` column name (the
    rows marked * come from Python calls, not the command)."""
    rows = {}
    for label, gaussian, student in re.findall(
        r"^\| ([\w ./,*()x-]+?) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M
    ):
        if "*" in label:
            continue
        fmt, granularity = (part.strip() for part in label.split("/"))
        granularity = re.sub(r" \(.*\)", "", granularity).replace(" ", "")
        rows[f"{fmt}/{granularity}"] = (gaussian, student)
    return rows


def test_the_formats_page_sqnr_table_is_what_lowbit_formats_measures(tmp_path, capsys):
    """docs/formats.md names the command and tensors of its SQNR table; run it and compare every
    row (the bf16 and fp16 rows were of a scaled cast the command no longer makes)."""
    gaussian = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        student = torch.distributions.StudentT(3.0).sample((256, 1024))
    path = tmp_path / "sqnr_data.pt"
    torch.save({"gaussian": gaussian, "student_t3": student}, path)
    assert main(["formats", "--tensor", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("tensor"))
    columns = header.split()[1:]
    measured = {
        row.split()[0]: row.split()[1:]
        for row in lines
        if row.split()[:1] in (["gaussian"], ["student_t3"])
    }
    printed = {
        column: (measured["gaussian"][i], measured["student_t3"][i])
        for i, column in enumerate(columns)
    }
    shown = _sqnr_table((ROOT / "docs" / "formats.md").read_text())
    assert shown == printed


def _missing_tests(page: str, text: str) -> list[str]:
    """A test the page cites as evidence, by node id (`tests/nn/test_layers.py::test_x`) or by
    a bare file name (`test_hunt_s29.py`, in a section that names its folder): the test is there
    to be run (tests/test_docs_s30.py checks the files cited with their folder)."""
    files = {path.name for path in (ROOT / "tests").rglob("test_*.py")}
    missing = []
    for match in re.finditer(r"(tests/[\w/]+\.py)::(\w+)", text):
        path = ROOT / match[1]
        if not path.exists() or not re.search(rf"def {match[2]}\b", path.read_text()):
            missing.append(f"{page}:{_line(text, match.start())}: {match[0]}")
    for match in re.finditer(r"(?<![\w/])(test_\w+\.py)", text):
        if match[1] not in files:
            missing.append(f"{page}:{_line(text, match.start())}: {match[1]}")
    return missing


def test_every_test_the_docs_cite_exists():
    missing = [m for page in PAGES for m in _missing_tests(page.name, page.read_text())]
    assert not missing, "tests the docs cite that are not there:\n" + "\n".join(missing)


def test_the_test_check_catches_a_renamed_test():
    text = "`tests/nn/test_layers.py::test_agrees_with_torchao` and `test_hunt_s99.py`\n"
    assert _missing_tests("scratch.md", text) == [
        "scratch.md:1: tests/nn/test_layers.py::test_agrees_with_torchao",
        "scratch.md:1: test_hunt_s99.py",
    ]
