"""Session 34: the default corpus, the standard library's ``.py`` sources, read without walking
the folders it leaves out.

Every default run, test, compare worker and rank walked all of site-packages and the test suites
(~13,000 ``.py`` files) to drop them: ~0.4 s per process. The documents must stay exactly the
ones the documented rule gives (names, texts, order, splits): the golden runs depend on them.
"""

import hashlib
import os
from pathlib import Path

import pytest

from lowbit.data import corpus, load_corpus
from lowbit.data.corpus import SPLITS, stdlib_documents, stdlib_root

EXCLUDED = {"site-packages", "test", "tests", "idlelib", "lib2to3"}


def reference_documents(base: Path) -> list[tuple[str, str]]:
    """The rule as the module documents it, written independently: every ``.py`` file (or link
    to one) under ``base``, folder links not followed, in no excluded folder, that is UTF-8;
    ``(relative name, sha256 of the text)`` sorted by name."""
    docs = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if EXCLUDED.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        docs.append((rel.as_posix(), hashlib.sha256(text.encode("utf-8")).hexdigest()))
    return sorted(docs)


def reference_split(name: str) -> str:
    bucket = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def digests(docs) -> list[tuple[str, str]]:
    return [(d.name, hashlib.sha256(d.text.encode("utf-8")).hexdigest()) for d in docs]


@pytest.fixture
def fresh_cache():
    corpus.stdlib_documents.cache_clear()
    yield
    corpus.stdlib_documents.cache_clear()


def test_the_stdlib_corpus_is_the_documented_files_in_order_and_split(fresh_cache):
    expected = reference_documents(stdlib_root())
    assert digests(stdlib_documents()) == expected
    splits = load_corpus().splits
    for split in SPLITS:
        assert [d.name for d in splits[split]] == [
            name for name, _ in expected if reference_split(name) == split
        ]


@pytest.fixture
def odd_library(tmp_path):
    """A library folder with every kind of entry the walk must judge as rglob did."""
    root = tmp_path / "test"  # the library's own folder may carry an excluded name
    for rel in [
        "os.py",
        "test.py",  # a file named as an excluded folder is read
        "json/decoder.py",
        ".hidden/h.py",
        "pkg/sub/deep.py",
        "pkg/tests/t.py",
        "site-packages/torch/x.py",
        "a/b/idlelib/c/d.py",
        "Upper.PY",
        "notes.txt",
        "dir.py/inner.py",  # a folder named like a module: not a file, but walked into
    ]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {rel}\n", encoding="utf-8")
    (root / "latin1.py").write_bytes("# caf\u00e9\n".encode("latin-1"))  # not UTF-8: skipped
    (root / "bom.py").write_bytes("\ufeffx = 1\n".encode())
    os.symlink(root / "json" / "decoder.py", root / "alias.py")  # a link to a file: read
    os.symlink(root / "pkg", root / "linked")  # a link to a folder: not followed
    os.symlink(root / "nowhere.py", root / "dangling.py")
    os.symlink(root / "loop.py", root / "loop.py")
    os.symlink(root / "pkg", root / "pkglink.py")  # a link to a folder named like a module
    return root


def test_odd_entries_are_judged_as_the_documented_rule_does(odd_library, fresh_cache):
    docs = stdlib_documents(str(odd_library))
    assert digests(docs) == reference_documents(odd_library)
    assert [d.name for d in docs] == [
        ".hidden/h.py",
        "alias.py",
        "bom.py",
        "dir.py/inner.py",
        "json/decoder.py",
        "os.py",
        "pkg/sub/deep.py",
        "test.py",
    ]


def test_the_excluded_folders_are_never_listed(odd_library, fresh_cache, monkeypatch):
    """Listed, site-packages alone held ~13,000 ``.py`` files that were matched and dropped."""
    listed = []
    scandir = os.scandir

    def recording(path="."):
        listed.append(Path(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", recording)
    stdlib_documents(str(odd_library))
    assert listed
    assert not [p for p in listed if EXCLUDED.intersection(p.relative_to(odd_library).parts)]
