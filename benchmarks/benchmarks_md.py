"""Writing one benchmark's section of BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import argparse
import copy
import platform
import re
import shlex
import sys
from pathlib import Path

from lowbit.cli import parse_in_full
from lowbit.errors import UsageError
from lowbit.train.config import write_atomically

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(heading: str, text: str, path: Path | None = None) -> None:
    """Replace the section under ``heading`` (up to the next ``## ``) of ``path`` (default
    `BENCHMARKS_MD`, looked up at the call) with ``text``, or append it."""
    path = BENCHMARKS_MD if path is None else path
    section = f"{heading}\n\n{text}\n"
    try:
        old = path.read_text() if path.exists() else "# Benchmarks\n"
        pattern = re.compile(re.escape(heading) + r"\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(old):
            new = pattern.sub(lambda _: section + "\n", old, count=1).rstrip("\n") + "\n"
        else:
            new = old.rstrip("\n") + "\n\n" + section
        # whole or not at all: a Ctrl-C mid-write left a truncated page, every other section lost
        write_atomically(path, new)
    except OSError as error:  # a read-only checkout: a traceback after the whole benchmark ran
        raise UsageError(page_not_written(path, error)) from None


def page_not_written(path: Path, error: OSError) -> str:
    """The one line for a page that could not be updated; the results are printed above it."""
    return (
        f"{path} not updated ({error.strerror or error}); the results are printed above; fix: "
        "make the page writable and run again, or leave out --write"
    )


def cpu_description() -> str:
    """The CPU model and the matrix/bf16 instruction sets that decide emulated-GEMM speed."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8")
    present = [flag for flag in wanted if flag in flags]
    return f"{model} ({', '.join(present) if present else 'no AVX-512/AMX'})"


def command_line() -> str:
    """The command that ran this benchmark, as a reader would type it (an argument with a space
    quoted, as a shell reads it back)."""
    script = Path(sys.argv[0]).name
    return shlex.join(["python", f"benchmarks/{script}", *sys.argv[1:]])


def publish(heading: str, text: str, write: bool) -> None:
    """Print a benchmark's section and, with ``write``, put it into BENCHMARKS.md."""
    print(text)
    if write:
        write_section(heading, text)


class ScriptParser(argparse.ArgumentParser):
    """A benchmark script's parser, refusing flags as `lowbit` does (`parse_in_full`): a flag is
    taken only as spelt in full (argparse took any unique prefix: ``--round 3`` ran as
    ``--rounds 3``, and a prefix unique today turns ambiguous the day a flag is added), and one it
    does not take is refused in one line naming the flags it may mean, exit status 2."""

    def __init__(self, **options):
        super().__init__(allow_abbrev=False, **options)

    def parse_args(self, args=None):
        try:
            return parse_in_full(self, args)
        except UsageError as error:
            self.exit(2, f"{self.prog}: error: {error}\n")


class DefaultsFormatter(argparse.HelpFormatter):
    """`--help` names each setting's default where it has one and its help does not already say
    it (most flags had no help at all): a quick run's smallest settings are found there."""

    def _format_action(self, action):
        if not action.help and _has_default(action):  # a bare flag: its default alone
            action = copy.copy(action)
            action.help = "default %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if not _has_default(action) or "default" in action.help:
            return action.help
        return f"{action.help} (default %(default)s)"


def _has_default(action) -> bool:
    """Whether --help should name ``action``'s default: not None, False (a switch), "" or
    argparse's SUPPRESS."""
    default = action.default
    return not (default is None or default is False or default in ("", argparse.SUPPRESS))


def at_least(parser: argparse.ArgumentParser, args, low: int, *names: str) -> None:
    """Refuse, with ``parser``'s one-line error (exit status 2), the first of the settings
    ``names`` (attribute names of ``args``, e.g. "batch_size" for --batch-size) below ``low``,
    naming its flag and value: "--rounds must be at least 1, got 0". A setting left at None (not
    given, no default) is not checked."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def run_script(main) -> None:
    """Exit with ``main()``'s status; lowbit's refusal of a setting (an unknown --recipe, a run
    folder that is none) is one line naming the fix, as `lowbit` prints it, not a traceback, and
    a Ctrl-C one line and status 130, as `lowbit` says it (a page is written whole at the end,
    `write_section`, so one stopped midway is left as it was)."""
    try:
        code = main()
    except UsageError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":  # run by hand it measured nothing and said nothing, exit status 0
    ScriptParser(
        description=__doc__ + " A module the benchmark scripts import: it measures nothing."
    ).parse_args()
    print(
        f"{Path(sys.argv[0]).name}: error: a module the benchmark scripts import, not a "
        "benchmark; fix: run one of the other scripts in benchmarks/ (each has --help)",
        file=sys.stderr,
    )
    sys.exit(2)
