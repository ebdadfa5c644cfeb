"""The docs against the code (session 26): what README.md and docs/*.md quote of the command line
is what the command line takes and prints."""

import re
from pathlib import Path

from lowbit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _command_options() -> dict[str, set[str]]:
    """Each `lowbit` command's option strings, from the parser the command line is built with."""
    commands = build_parser()._subparsers._group_actions[0].choices
    return {
        name: {flag for action in parser._actions for flag in action.option_strings}
        for name, parser in commands.items()
    }


def _quoted_command_lines(page: Path):
    """(line number, command, rest of the line) of every `lowbit COMMAND ...` the page quotes, a
    command continued with a trailing backslash read as one line."""
    text = page.read_text().replace("\\\n", " ")
    for match in re.finditer(r"\blowbit (\w+)\b([^\n`]*)", text):
        yield text[: match.start()].count("\n") + 1, match[1], match[2]


def test_every_flag_the_docs_quote_is_one_the_command_takes():
    """A flag renamed or dropped in the code while a page still shows it sends a user who copies
    the command line into argparse's 'unrecognized arguments'."""
    options = _command_options()
    stale = [
        f"{page.relative_to(ROOT)}:{line}: lowbit {command} {flag}"
        for page in PAGES
        for line, command, rest in _quoted_command_lines(page)
        if command in options
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest)
        if flag not in options[command]
    ]
    assert not stale, "flags the docs quote that the command does not take:\n" + "\n".join(stale)


def test_the_formats_page_shows_what_lowbit_formats_prints(capsys):
    """docs/formats.md shows the table of `lowbit formats`, every limit derived from the bit
    layout: a format added, dropped or changed in the code is a stale table on the page."""
    page = (ROOT / "docs" / "formats.md").read_text()
    shown = re.search(r"```\n(format +bits.*?)```", page, re.S)
    assert shown, "docs/formats.md no longer shows the table of lowbit formats"
    assert main(["formats"]) == 0
    assert capsys.readouterr().out == shown[1]


def test_every_recipe_the_docs_pass_to_recipe_is_a_preset():
    """`--recipe NAME` (or `--recipes A,B`) on a page names presets `lowbit.get_recipe` knows."""
    from lowbit.errors import UsageError
    from lowbit.recipes import get_recipe

    unknown = []
    for page in PAGES:
        for line, _, rest in _quoted_command_lines(page):
            for names in re.findall(r"--recipes? ([\w:,-]+)", rest):
                for name in set(names.split(",")) - {"R", "RECIPE"}:  # placeholders
                    try:
                        get_recipe(name)
                    except UsageError:
                        unknown.append(f"{page.relative_to(ROOT)}:{line}: {name}")
    assert not unknown, "recipes the docs name that are no preset:\n" + "\n".join(unknown)
