"""The `lowbit` command line: one subcommand per module in `lowbit.commands`.

Each command module has ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from lowbit.errors import UsageError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Train language models in mixed and low precision, and measure what it costs.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(f"lowbit.commands.{module_name}")
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):  # `lowbit recipes | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UsageError as error:
        print(f"lowbit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
