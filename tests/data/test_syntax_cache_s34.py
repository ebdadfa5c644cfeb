"""The on-disk cache of the token-classification task's tagged files (`lowbit.data.cache`).

Every process that built the task tagged ~90 stdlib files again (seconds): each `lowbit compare
--jobs` worker, each test subprocess. The cache must give exactly what tagging gives, never a
stale or damaged entry, and never fail or slow a run where it cannot be written.
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lowbit.data import syntax_tag_task, syntax_tags
from lowbit.data.corpus import stdlib_documents

SMALL = {"max_files": 4, "max_eval_files": 1, "window": 40}
SOURCES = {
    # names spread over the three splits by the corpus's sha1 rule
    **{f"m{i}.py": f"def f{i}(a, b=1):\n    return a.x(b) + {i}\n" for i in range(40)},
    "café.py": "s = 'é' 'x'\nclass Ü: pass\n",
    "broken.py": "def (:\n",
}


def plain(task):
    """A task's sentences as plain lists, for comparing and for JSON."""
    return {split: [[s.tokens, s.tags] for s in sents] for split, sents in task.items()}


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("syntax-tags/*/*.json"))


@pytest.fixture
def corpus(tmp_path):
    """A small folder of Python files, read as the task's corpus (``root``)."""
    root = tmp_path / "src"
    root.mkdir()
    for name, text in SOURCES.items():
        (root / name).write_text(text, encoding="utf-8")
    stdlib_documents.cache_clear()  # the folder's texts are read afresh
    yield root
    stdlib_documents.cache_clear()


def uncached(monkeypatch, **kw):
    with monkeypatch.context() as patch:
        patch.setenv("LOWBIT_CACHE_DIR", "")
        return plain(syntax_tag_task(**kw))


def test_a_second_process_reads_what_the_first_tagged(tmp_path, monkeypatch):
    """A fresh process with the same cache folder reads the stdlib files' tags, identical to
    tagging them (sentences, tokens, tags, order), without calling the tagger."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(cache))
    out = tmp_path / "first.json"
    script = (
        "import json, sys\nfrom lowbit.data import syntax_tag_task\n"
        f"task = syntax_tag_task(**{SMALL!r})\n"
        "json.dump({k: [[s.tokens, s.tags] for s in v] for k, v in task.items()}, "
        "open(sys.argv[1], 'w'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    first = json.loads(out.read_text())
    assert len(entries(cache)) == SMALL["max_files"] + 2 * SMALL["max_eval_files"]

    assert first == uncached(monkeypatch, **SMALL)
    monkeypatch.setattr(syntax_tags, "tag_source", None)  # not called: cache hits only
    assert plain(syntax_tag_task(**SMALL)) == first


def test_cached_tags_equal_tagging_for_unicode_and_skip_what_does_not_parse(
    corpus, tmp_path, monkeypatch
):
    """Non-ASCII names and strings survive the round trip; a file that does not parse is still
    skipped, and not cached (it raises again on every call, as without a cache)."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    kw = {"root": str(corpus), "max_files": 100, "max_eval_files": 100, "window": 8}
    fresh = uncached(monkeypatch, **kw)
    assert plain(syntax_tag_task(**kw)) == fresh
    assert any("'é'" in w for split in fresh.values() for s in split for w in s[0])
    assert len(entries(tmp_path / "cache")) == len(SOURCES) - 1  # broken.py: not cached
    (corpus / "broken.py").unlink()  # else the poisoned tagger below would be called for it
    stdlib_documents.cache_clear()
    monkeypatch.setattr(syntax_tags, "tag_source", None)
    assert plain(syntax_tag_task(**kw)) == fresh


def foreign(entry: bytes) -> bytes:
    """The entry's header made to vouch for another value (``[]``, a file of no lines)."""
    header = json.loads(entry.split(b"\n")[0])
    header["sha256"] = hashlib.sha256(b"[]").hexdigest()
    return json.dumps(header).encode() + b"\n[]"


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # cut short (a torn write, a full disk)
        lambda b: b.replace(b'"a', b'"b', 1),  # edited, still JSON: the checksum differs
        lambda b: b"\xff\xfe not json",
        lambda b: b"",
        foreign,
    ],
)
def test_a_damaged_entry_is_recomputed_and_rewritten(corpus, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    kw = {"root": str(corpus), "max_files": 5, "max_eval_files": 1}
    first = plain(syntax_tag_task(**kw))
    for entry in entries(tmp_path / "cache"):
        entry.write_bytes(damage(entry.read_bytes()))
    assert plain(syntax_tag_task(**kw)) == first
    monkeypatch.setattr(syntax_tags, "tag_source", None)  # rewritten: now read, not tagged
    assert plain(syntax_tag_task(**kw)) == first


def test_a_changed_file_is_tagged_again_not_read_from_its_old_entry(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    kw = {"root": str(corpus), "max_files": 100, "max_eval_files": 100}
    before = plain(syntax_tag_task(**kw))
    for name in SOURCES:
        if name.startswith("m"):
            (corpus / name).write_text("class C:\n    x = f(1)\n", encoding="utf-8")
    stdlib_documents.cache_clear()
    after = plain(syntax_tag_task(**kw))
    assert after != before and after == uncached(monkeypatch, **kw)
    assert ["class", "C", ":", "x"] in [s[0][:4] for split in after.values() for s in split]


def test_an_empty_cache_setting_writes_nothing_anywhere(corpus, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", "")
    syntax_tag_task(root=str(corpus))
    assert list(home.iterdir()) == []


@pytest.mark.parametrize("xdg", [True, False])
def test_without_a_setting_the_cache_is_in_the_users_cache_folder(
    corpus, tmp_path, monkeypatch, xdg
):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("LOWBIT_CACHE_DIR")
    if xdg:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    else:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    syntax_tag_task(root=str(corpus), max_files=2, max_eval_files=1)
    folder = tmp_path / "xdg" / "lowbit" if xdg else home / ".cache" / "lowbit"
    assert len(entries(folder)) == 4


def test_a_cache_folder_that_cannot_be_made_is_no_error(corpus, tmp_path, monkeypatch, capsys):
    """A cache path under a file (unwritable to root too): the task is computed, silently."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "file" / "cache"))
    kw = {"root": str(corpus), "max_files": 5, "max_eval_files": 1}
    assert plain(syntax_tag_task(**kw)) == uncached(monkeypatch, **kw)
    assert capsys.readouterr() == ("", "")


def test_a_read_only_or_full_cache_folder_reads_its_entries_and_tries_one_write(
    corpus, tmp_path, monkeypatch, capsys
):
    """Entries already there are read; the first failed write turns writing off for the call,
    not one failed write (and temporary file) per file."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    syntax_tag_task(root=str(corpus), max_files=2, max_eval_files=1)
    kept = entries(tmp_path / "cache")
    attempts = []

    def full_disk(*args, **kw):
        attempts.append(args)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    kw = {"root": str(corpus), "max_files": 8, "max_eval_files": 2}
    assert plain(syntax_tag_task(**kw)) == uncached(monkeypatch, **kw)
    assert len(attempts) == 1 and entries(tmp_path / "cache") == kept
    assert capsys.readouterr() == ("", "")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".tmp")]


def test_old_generations_are_deleted_so_the_cache_stays_bounded(corpus, tmp_path, monkeypatch):
    """A new tagger or Python starts a generation; only the few most recent ones are kept."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(cache))
    for age in range(6):
        old = cache / "syntax-tags" / f"py00-old{age}"
        old.mkdir(parents=True)
        (old / "x.json").write_text("{}")
        os.utime(old, (1_000_000 - age, 1_000_000 - age))
    syntax_tag_task(root=str(corpus), max_files=1, max_eval_files=1)
    left = sorted(p.name for p in (cache / "syntax-tags").iterdir())
    assert len(left) == 4 and left[:3] == ["py00-old0", "py00-old1", "py00-old2"]
    assert left[3].startswith("py") and list((cache / "syntax-tags" / left[3]).glob("*.json"))
