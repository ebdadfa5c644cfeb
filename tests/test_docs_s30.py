"""The docs against the code (session 30): the Python names, repository files, sections and flag
values that README.md and docs/*.md point a reader to are ones the code and the pages still have.
(tests/test_docs_s26.py checks the flags themselves.)"""

import importlib
import re
from pathlib import Path

from lowbit.distributed.context import STRATEGIES
from lowbit.infer.quant import targets
from lowbit.memory.estimate import TASKS as ESTIMATE_TASKS
from lowbit.optim.states import STATE_PRECISIONS
from lowbit.recipes.recipe import DTYPES
from lowbit.train.config import TASKS, TOKENIZERS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_spans(text: str):
    """(line number, text) of every `inline code` span of a page."""
    for match in re.finditer(r"`([^`\n]+)`", text):
        yield text[: match.start()].count("\n") + 1, match[1]


def _resolves(dotted: str) -> bool:
    """Whether `lowbit.a.b.c` is a module, or an attribute reached from the longest importable
    module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def _stale_names(page: str, text: str) -> list[str]:
    stale = []
    for line, span in _code_spans(text):
        for dotted in re.findall(r"(?<![\w/.])lowbit(?:\.\w+)+", span):
            if dotted.endswith(".pt"):  # a file name (a .dcp checkpoint's `lowbit.pt`), no module
                continue
            if not _resolves(dotted):
                stale.append(f"{page}:{line}: {dotted}")
    # repository files anywhere on the page: in prose, code spans and fenced commands alike
    for match in re.finditer(r"(?<![\w/.-])((?:lowbit|benchmarks|scripts|tests)/[\w./-]*\w)", text):
        if not (ROOT / match[1]).exists():
            stale.append(f"{page}:{text[: match.start()].count(chr(10)) + 1}: {match[1]}")
    return stale


def test_every_lowbit_name_and_file_the_docs_quote_exists():
    """A function moved or renamed (`lowbit.diagnostics.auto.plan_over_time`), or a script or
    test file the page cites deleted, leaves a reader with an ImportError or a missing file."""
    stale = [s for page in PAGES for s in _stale_names(page.name, page.read_text())]
    assert not stale, "names and files the docs quote that do not exist:\n" + "\n".join(stale)


def test_the_name_check_catches_a_renamed_function():
    """The check above is no tautology: a page naming what the code does not have fails it."""
    text = "see `lowbit.diagnostics.auto.plan_over_tim(run_dir)`\n```\npython benchmarks/nope.py\n```\n"
    assert len(_stale_names("scratch.md", text)) == 2


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _sections(path: Path) -> tuple[set[str], set[str]]:
    """The headings of a page, and the bold run-in titles of its paragraphs (`**Several
    processes**`), which the pages cite by name too."""
    text = path.read_text()
    headings = set(re.findall(r"^#+ (.+?)\s*$", text, re.M))
    return headings, set(re.findall(r"^\*\*(.+?)\.?\*\*", text, re.M))


def _stale_sections(page: Path, text: str) -> list[str]:
    stale = []
    for target, anchor in re.findall(r"\]\(([\w./-]+\.md)#([\w-]+)\)", text):
        headings, _ = _sections(page.parent / target)
        if anchor not in {_slug(h) for h in headings}:
            stale.append(f"{page.name}: {target}#{anchor}")
    for target, title in re.findall(r"((?:docs/)?[\w-]+\.md),? \"([^\"]+)\"", text):
        path = ROOT / target if (ROOT / target).exists() else page.parent / target
        title = " ".join(title.split())  # a title the text wraps over two lines
        headings, run_in = _sections(path)
        if not any(h.startswith(title) for h in headings) and title not in run_in:
            stale.append(f'{page.name}: {target}, "{title}"')
    return stale


def test_every_section_the_docs_point_to_exists():
    """A link anchor (`docs/recipes.md#per-layer-overrides`) or a cited section (`docs/parity.md,
    "Golden loss curves"`) whose heading was renamed sends the reader to the top of the page."""
    stale = [s for page in PAGES for s in _stale_sections(page, page.read_text())]
    assert not stale, "sections the docs point to that are not there:\n" + "\n".join(stale)


def test_the_section_check_catches_a_renamed_heading():
    scratch = ROOT / "README.md"
    text = 'see [x](docs/recipes.md#per-layer-override) and docs/parity.md, "Golden curves"\n'
    assert len(_stale_sections(scratch, text)) == 2


# The values each closed-choice flag takes, from the code that checks them.
CHOICES = {
    "task": set(TASKS),
    "tokenizer": set(TOKENIZERS),
    "optimizer-state": set(STATE_PRECISIONS),
    "strategy": set(STRATEGIES),
    "sharding": {"none", *STRATEGIES},
    "to": set(targets()),
    "dtype": set(DTYPES),
}


def _bad_values(page: str, text: str) -> list[str]:
    """A closed-choice flag's values in the `lowbit COMMAND ...` lines of a page (a `a|b` list
    split; an upper-case placeholder such as `S` skipped) that the command does not take."""
    bad = []
    text = text.replace("\\\n", " ")
    for match in re.finditer(r"\blowbit (\w+)\b([^\n`]*)", text):
        line = text[: match.start()].count("\n") + 1
        for flag, values in re.findall(r"--([a-z-]+)[ =]([\w|:.-]+)", match[2]):
            if flag not in CHOICES:
                continue
            allowed = (
                set(ESTIMATE_TASKS) if (match[1], flag) == ("estimate", "task") else CHOICES[flag]
            )
            for value in values.split("|"):
                if not value.isupper() and value not in allowed:
                    bad.append(f"{page}:{line}: lowbit {match[1]} --{flag} {value}")
    return bad


def test_every_value_the_docs_give_a_closed_flag_is_one_the_command_takes():
    """`--task`, `--optimizer-state`, `--strategy`, `--to`, `--dtype` ... with a value the code
    no longer takes (a task or format renamed) is a quoted command that stops with an error."""
    bad = [b for page in PAGES for b in _bad_values(page.name, page.read_text())]
    assert not bad, "values the docs give that the command refuses:\n" + "\n".join(bad)


def test_the_value_check_catches_a_renamed_choice():
    text = "    $ lowbit quantize RUN --to int3\n    $ lowbit train --optimizer-state 8bit|2bit\n"
    assert _bad_values("scratch.md", text) == [
        "scratch.md:1: lowbit quantize --to int3",
        "scratch.md:2: lowbit train --optimizer-state 2bit",
    ]
