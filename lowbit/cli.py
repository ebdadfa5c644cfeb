"""The `lowbit` command line: one subcommand per module in `lowbit.commands`.

Each command module has ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import errno
import glob as globbing
import importlib
import json
import os
import re
import shlex
import signal
import sys
import time

from lowbit.errors import (
    RunNotWritten,
    UsageError,
    drop_held_notes,
    interrupted_line,
    is_interrupt,
    raise_terminated,
    stop_on_sigterm,
    stopping,
)

COMMAND_MODULES = [
    "formats",
    "estimate",
    "recipes",
    "train",
    "eval",
    "generate",
    "compare",
    "quantize",
    "prune",
    "export",
    "doctor",
]


# errno -> (exit status, fix) of the file-system failures that are the user's path or disk, not a
# bug: a wrong --out (status 2, as a usage error) or a full disk (1). Other OSErrors, a missing
# file among them (one lowbit should have written), keep their traceback.
FILESYSTEM_ERRORS = {
    errno.ENOTDIR: (2, "a folder on the path is a file; choose another path"),
    errno.EISDIR: (2, "the path is a folder; choose a file path"),
    errno.EEXIST: (2, "something is in the way at that path; move it away or choose another path"),
    errno.EACCES: (2, "choose a path you may write to, or change its permissions"),
    errno.EPERM: (2, "choose a path you may write to, or change its permissions"),
    errno.EROFS: (2, "choose a path on a writable file system"),
    errno.ENAMETOOLONG: (2, "choose a shorter path"),
    errno.ENOSPC: (1, "free disk space, or write to another disk"),
    errno.EDQUOT: (1, "free disk space under your quota, or write to another disk"),
}


def _version() -> str:
    """lowbit's version with the PyTorch and Python it runs on (bug reports need all three); read
    from the installed metadata, without importing torch."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from lowbit import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"lowbit {__version__} (torch {torch_version}, Python {platform.python_version()})"


def report_error(text: str) -> None:
    """``text`` on stderr, once per torchrun job: every rank parses the same arguments and fails
    alike, so a rank other than 0 that torchrun started (its ``TORCHELASTIC_ERROR_FILE`` set)
    leaves the line to rank 0 and writes it to that file instead, where torchrun's failure summary
    shows it: an error of that rank's own still reaches the user. Elsewhere every process prints
    (the `--nproc` launcher prints its ranks' error itself)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get("RANK", "0") == "0" or not error_file:
        print(text, file=sys.stderr)
        return
    with open(error_file, "w") as file:  # the format of torch.distributed.elastic's ErrorHandler
        json.dump({"message": text, "timestamp": int(time.time())}, file)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a flag is taken only as spelt in full. argparse took any unique prefix
    # (`compare --seed 2` ran as --seeds 2), and a prefix unique today would turn ambiguous, and
    # break a script, the day a flag is added; `unrecognized` suggests the flags one may mean.
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Train language models in mixed and low precision, and measure what it costs.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(f"lowbit.commands.{module_name}")
        command = sub.add_parser(
            module.NAME, help=module.HELP, description=module.HELP, allow_abbrev=False
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def unrecognized(parser: argparse.ArgumentParser, command: str | None, extras: list[str]) -> str:
    """The one line refusing the arguments no parser took (``extras``; argparse's own message was
    the whole usage and "unrecognized arguments: ..."): the first flag among them, with the flags
    of ``command`` it may mean (`spelt_alike`: a shortened flag, one part of a flag, a near miss)
    and the gist of each one's help, up to its first "; " or " (": ``--seed`` of `lowbit compare`
    is '--seeds' (seeds per recipe) or '--first-seed' (seeds are N, N+1, ...)."""
    from lowbit.recipes.presets import did_you_mean, spelt_alike

    if command is not None:
        parser = _subparsers(parser).choices[command]
    gists = {
        # a --no-X spelling shares its action, and the help, of --X, which says the opposite
        flag: "" if flag.startswith("--no-") else re.split(r"; | \(", action.help or "")[0]
        for action in parser._actions
        if action.help != argparse.SUPPRESS  # a flag refused on purpose (compare --nproc)
        for flag in action.option_strings
        if flag.startswith("--")
    }
    named = [arg for arg in extras if arg != "--"] or extras  # `--` itself names nothing
    given = next((arg for arg in named if arg.startswith("-")), named[0]).split("=", 1)[0]
    where = f"{command} {given}" if command else given
    alike = spelt_alike(given, list(gists)) if given.startswith("--") else []
    if not alike or len(alike) > 3:
        return f"{where}: unrecognized argument; fix: see {parser.prog} --help"
    shortened = " (a flag is taken only in full)" if alike[0].startswith(given) else ""
    return f"{where}: unrecognized argument{shortened}; fix: {did_you_mean(alike, gists)}"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def unknown_flag(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str | None, str] | None:
    """The first ``--flag`` (or ``--flag=value``) in ``argv`` that neither lowbit nor its command
    takes, with the command it was given to (None: before any), or None. Looked for before
    argparse parses: a shortened required flag (``compare --recipe``, train's spelling of
    --recipes) was otherwise reported as the required one missing, in argparse's usage block,
    before the unknown one was seen. Arguments after a bare ``--`` are values, not flags. A
    parser without commands (a benchmark script's) is its own command, None."""
    commands = getattr(_subparsers(parser), "choices", {})
    command, taken = None, set(parser._option_string_actions)
    for arg in argv:
        if arg == "--":
            return None
        if command is None and arg in commands:
            command, taken = arg, set(commands[arg]._option_string_actions)
        elif arg.startswith("--") and arg.split("=", 1)[0] not in taken:
            return command, arg
    return None


def parse_in_full(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` (None: the process's arguments) for a parser made with
    ``allow_abbrev=False``, a flag taken only as spelt in full: a flag that neither it nor the
    command given takes is refused in one line (`UsageError`, `unrecognized`), not argparse's
    usage block. lowbit's parser and the benchmark scripts' (benchmarks/benchmarks_md.py)."""
    unknown = unknown_flag(parser, sys.argv[1:] if argv is None else argv)
    if unknown is not None:
        raise UsageError(unrecognized(parser, *unknown[:1], [unknown[1]]))
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = getattr(args, "command", None)
        raise UsageError(
            expanded_glob(args, command, extras) or unrecognized(parser, command, extras)
        )
    return args


def expanded_glob(args: argparse.Namespace, command: str | None, extras: list[str]) -> str | None:
    """The refusal of a `--data` glob the shell expanded (``--data docs/*.md`` unquoted): its
    first file became the value and the others were extra arguments, refused with only --help
    as the fix. None where ``extras`` are not all files that exist beside a --data file (a
    folder after a file: ``--data a.txt runs/``, --out forgotten, no glob)."""
    data = getattr(args, "data", None)
    if not data or not os.path.isfile(data) or not all(os.path.isfile(p) for p in extras):
        return None
    pattern = _glob_of([data, *extras])
    quote = f"the glob, --data {shlex.quote(pattern)}," if pattern else "the glob you typed"
    where = f"{command} {extras[0]}" if command else extras[0]
    return (
        f"{where}: unrecognized argument after --data {data}, {len(extras)} more path"
        f"{'s' if len(extras) > 1 else ''} (a glob the shell expanded?); fix: quote {quote} "
        "for lowbit to read every file it matches, or give their folder"
    )


def _glob_of(files: list[str]) -> str | None:
    """A glob of the files' common start and end around one ``*`` (``d/train_*.txt`` of
    d/train_1.txt and d/train_2.txt) where it matches exactly those files, else None: the glob
    the user typed is not known, and one that matched other files read other data."""
    start = os.path.commonprefix(files)  # noqa: RUF071 -- by character: train_1, train_2
    end = os.path.commonprefix([f[len(start) :][::-1] for f in files])[::-1]  # noqa: RUF071
    pattern = globbing.escape(start) + "*" + globbing.escape(end)
    matched = {os.path.normpath(p) for p in globbing.glob(pattern)}
    return pattern if matched == {os.path.normpath(f) for f in files} else None


def _interrupt_again(unraisable, default=sys.unraisablehook) -> None:
    """`sys.unraisablehook` of the command: a Ctrl-C that lands in code that cannot raise (an
    import lock's weakref callback, as the start-up imports) was printed as "Exception ignored
    in: ... KeyboardInterrupt" and lost, the command going on. It is raised again in the main
    thread, where `main` reports it: from a timer thread, 10 ms on (a signal made pending here
    would be raised in this hook again, and lost the same way); ``interrupt_main`` does nothing
    once SIGINT is no longer Python's (the command done, `main`'s ``finally``)."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        import _thread
        import threading

        timer = threading.Timer(0.01, _thread.interrupt_main)
        timer.daemon = True
        timer.start()
        return
    default(unraisable)


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):  # `lowbit recipes | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if argv is None:  # the command's process (not a test's or a program's call)
        sys.unraisablehook = _interrupt_again
        # a SIGTERM stops the command as a Ctrl-C does: `lowbit train`'s steps save and stop, and
        # elsewhere (its start-up, say) one line, where it died without one
        stop_on_sigterm()
    try:
        # Inside the try: building the parser imports every command module (Transformers among
        # them), still part of the start-up a Ctrl-C may interrupt.
        parser = build_parser()
        args = parse_in_full(parser, argv)
        if not hasattr(args, "run"):
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except UsageError as error:
        report_error(f"lowbit: error: {error}")
        return 2
    except RunNotWritten as error:  # a full disk: which run, what is kept, how to go on
        report_error(f"lowbit: error: {error}")
        return 1
    # commands that save on Ctrl-C (train, compare) report it themselves
    except (KeyboardInterrupt, RuntimeError) as error:
        if not is_interrupt(error):
            raise
        print(interrupted_line(error), file=sys.stderr)
        return 130
    except OSError as error:
        if error.errno not in FILESYSTEM_ERRORS:
            raise
        status, fix = FILESYSTEM_ERRORS[error.errno]
        where = f"{error.filename}: " if error.filename else ""
        report_error(f"lowbit: error: {where}{error.strerror}; fix: {fix}")
        return status
    finally:
        drop_held_notes()  # a refused command's notes are not the next one's
        # The command is done: a Ctrl-C while Python shuts down (its exit handlers, some of them
        # torch's) ends the process as it would any program, not with a traceback from a handler.
        if argv is None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if signal.getsignal(signal.SIGTERM) == raise_terminated:
                # so does a SIGTERM, but one repeating a stop (a run's, or a SIGTERM's): the
                # command said so and exits 130, not killed by the signal as Python shuts down
                signal.signal(signal.SIGTERM, signal.SIG_IGN if stopping() else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
