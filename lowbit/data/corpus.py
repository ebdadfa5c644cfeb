"""Text corpora split into train / validation / test by a fixed rule.

The default corpus is the Python standard library's own ``.py`` sources of the running interpreter:
always present, no download, about 11 MB of text. User data comes from a folder, a glob, a single
text file or a JSONL file (`load_texts`).

The split is by document, never by position inside a document, and depends only on the document's
name: ``int(sha1(name)[:8], 16) % 100`` below 90 is train, below 95 validation, else test. A
document's split therefore never changes when other documents are added or removed. Names are
relative paths for files, ``"<file>:<line>"`` for JSONL records and paragraphs of a single file.

Data that comes split keeps its split (`split_documents`): where the top-level entries of a folder
or glob name a train split and another (``train/``, ``valid/``, ``test/`` folders; ``train.txt``,
``validation.jsonl``, ``test.jsonl`` files), each document under one of them is in that split, and
only the others go by the rule. Without a validation entry, the train entry's documents that the
rule puts in validation are the validation split.

Files are read as UTF-8 with a leading byte-order mark dropped (`read_text`) and cut into lines at
line feeds only (`read_lines`), so line numbers are the ones an editor shows (one text file of old
Mac line ends, carriage returns and no line feed, is cut at those: `_paragraph_documents`). A
folder or glob skips hidden files and folders (names starting with a dot) and follows folder links
(not back into a folder they are in), and a file reached under several names (symbolic links) is
read once, under its first name, so that no text lands in two splits.

`load_corpus` warns (one ``lowbit: warning:`` line each, once per process) about what a run would
otherwise take in without a word: text files that a folder does not read (a ``.jsonl`` beside the
``.txt`` files), binary files that a glob matched and does not read, and validation or test
documents whose text is also a training document's (the same file copied into ``train/`` and
``valid/``), which measure the validation loss on training text; and links to nothing and
folders that cannot be listed, which a folder or glob reached and could not read. It drops or
moves no document: the splits stay as the data gives them.

What lowbit wrote inside the data is no data, and a folder or glob leaves it out (with a warning):
a training run's files (``--out data/run``, or ``--out data --overwrite``) and a quantized, pruned
or exported model's folder. Read, a resumed run trained on its own metrics and checkpoints, on
data that changed as the first run wrote it.

`fingerprint` hashes the names and contents so that a run records exactly which text it saw.
"""

from __future__ import annotations

import codecs
import csv
import fnmatch
import functools
import glob
import hashlib
import io
import json
import os
import re
import shlex
import sysconfig
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import UsageError, check_given, pipe_as_data, warn_once

SPLITS = ("train", "validation", "test")
SPLIT_PERCENT = {"train": 90, "validation": 5, "test": 5}
# The names (before the first dot, any case) of a folder's or glob's top-level entries that hold
# one split of data that comes split: Hugging Face datasets' train/validation/test, WikiText's
# and fairseq's valid, CoNLL's and GLUE's dev. Not "training"/"testing": a folder of notes or docs
# has such topics.
SPLIT_NAMES = {
    "train": "train",
    "valid": "validation",
    "validation": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})
FOLDER_SUFFIXES = (".txt", ".md", ".py")
# Files read as JSON Lines. ``.json`` too: Hugging Face datasets' ``to_json`` and many exports write
# JSON Lines under that name, and read as paragraphs of text they trained on the JSON syntax; a
# JSON document that is not one object per line is refused at its first line instead.
JSONL_SUFFIXES = (".jsonl", ".json")
# How JSONL errors name a decoded value: by its JSON type, as the user wrote it in the file.
JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


@dataclass(frozen=True)
class Document:
    """One unit of the split: a file, a JSONL record or a paragraph."""

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Documents of each split, where they came from, and their fingerprint."""

    source: str
    splits: dict[str, list[Document]]
    # what the user should know about the data (files a folder skipped, text shared by splits)
    warnings: tuple[str, ...] = ()

    @functools.cached_property
    def fingerprint(self) -> dict:
        """``{split: {"files", "bytes", "sha256"}, "total": {...}, "source": ...}``."""
        out = {name: fingerprint(docs) for name, docs in self.splits.items()}
        out["total"] = fingerprint([d for docs in self.splits.values() for d in docs])
        out["source"] = self.source
        return out

    def split(self, name: str) -> list[Document]:
        """The documents of split ``name``; a `UsageError` if it is empty."""
        docs = self.splits[name]
        if not docs:
            one_line = _one_line_file(self.source, self.splits, name)
            if one_line is not None:
                raise UsageError(one_line)
            counts = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
            raise UsageError(
                f"{self.source}: the {name} split is empty ({counts} documents); fix: provide more "
                "documents: files of a folder or glob, JSONL records, or paragraphs of one text "
                "file (a blank line between them); each lands in "
                f"{name} with probability {SPLIT_PERCENT[name]}%, so ~100 documents make an empty "
                "split unlikely; or, for data that comes split, a top-level folder or file named "
                f"for the split ({'/'.join(k for k, v in SPLIT_NAMES.items() if v == name)})"
            )
        return docs

    def texts(self, name: str) -> list[str]:
        """The texts of split ``name`` (non-empty split)."""
        return [d.text for d in self.split(name)]


# The paragraphs `_one_line_file`'s fix cuts a file into: about this many, so that every split
# gets some (the validation split is 5% of them).
ONE_LINE_PARAGRAPHS = 500


def _one_line_file(source: str, splits: dict[str, list[Document]], empty: str) -> str | None:
    """The error for a split left empty because ``source`` is one text file of a single line (a
    text8-style dump: no line breaks, so one paragraph, one document), with the command that cuts
    it into paragraphs; None for any other data. The usual fix, "paragraphs of one text file (a
    blank line between them)", does not say how to get them from a file without line breaks.
    ``empty``: the name of the split that is empty."""
    path = Path(os.path.expanduser(source))
    docs = [d for split in splits.values() for d in split]
    # old Mac line ends (carriage returns) are line breaks too, which this fix does not mend
    if len(docs) != 1 or any(end in docs[0].text.strip() for end in "\n\r"):
        return None
    if not path.is_file() or path.suffix.lower() in JSONL_SUFFIXES:  # a JSONL record: add more
        return None
    size = len(docs[0].text.encode("utf-8"))
    width = max(100, size // ONE_LINE_PARAGRAPHS)
    if size // width < 100:  # too short to cut into enough paragraphs: more text is the fix
        return None
    out = shlex.quote(str(path.with_name(f"{path.stem}.paragraphs.txt")))
    return (
        f"{source}: one line of {size:,} bytes without line breaks (as text8 is): one paragraph, "
        f"one document, so the {empty} split is empty; fix: cut it into paragraphs at spaces, fold "
        f"-s -w {width} {shlex.quote(str(path))} | sed G > {out} (lines of up to {width} bytes, "
        f"a blank line after each), then --data {out}"
    )


def split_of(name: str) -> str:
    """The split of a document named ``name`` (see the module docstring for the rule)."""
    bucket = int(hashlib.sha1(name_bytes(name)).hexdigest()[:8], 16) % 100
    if bucket < SPLIT_PERCENT["train"]:
        return "train"
    if bucket < SPLIT_PERCENT["train"] + SPLIT_PERCENT["validation"]:
        return "validation"
    return "test"


def name_bytes(name: str) -> bytes:
    """A document's name as bytes: UTF-8, and a file name's bytes that are not UTF-8 (a Latin-1
    name unpacked from an old archive, which Python reads as lone surrogates) as they are on disk:
    strict UTF-8 stopped the whole run with a UnicodeEncodeError on such a name."""
    return name.encode("utf-8", errors="surrogateescape")


def split_documents(docs: list[Document]) -> dict[str, list[Document]]:
    """Group documents by `split_of` their name, keeping their order; data that comes split
    (see the module docstring) keeps its split. Split by name alone, a user's ``test.txt`` was
    trained on and their ``validation.jsonl`` too, while a few of their training files were
    taken to validate on."""
    named = _given_splits(docs)
    given = set(named.values()) - {None}
    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for doc in docs:
        split = named[doc.name] or split_of(doc.name)
        if split == "train" and "validation" not in given and split_of(doc.name) == "validation":
            split = "validation"
        splits[split].append(doc)
    return splits


def _given_splits(docs: list[Document]) -> dict[str, str | None]:
    """Each document's split by name, as the data gives it (`_named_split`); all None where the
    data does not come split (no ``train`` split named, or no other)."""
    named = {doc.name: _named_split(doc.name) for doc in docs}
    given = set(named.values()) - {None}
    return named if "train" in given and len(given) >= 2 else dict.fromkeys(named)


def _named_split(name: str) -> str | None:
    """The split that a document's top-level folder or file names (`SPLIT_NAMES`), if any:
    ``train/a.txt``, ``valid.txt``, ``test.jsonl:12`` (a JSONL record)."""
    top = name.split("/", 1)[0] if "/" in name else name.rsplit(":", 1)[0]
    return SPLIT_NAMES.get(top.split(".", 1)[0].lower())


def fingerprint(docs: list[Document]) -> dict:
    """Number of documents, UTF-8 bytes, and sha256 over (name, content) sorted by name."""
    digest = hashlib.sha256()
    total = 0
    for doc in sorted(docs, key=lambda d: d.name):
        name, data = name_bytes(doc.name), doc.text.encode("utf-8")
        total += len(data)
        for part in (name, data):  # length-prefixed so that boundaries cannot shift
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return {"files": len(docs), "bytes": total, "sha256": digest.hexdigest()}


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=2)
def stdlib_documents(root: str | None = None) -> tuple[Document, ...]:
    """The stdlib's ``.py`` files (see module docstring), sorted by relative path.

    Files that are not valid UTF-8 are skipped. Cached in memory for the life of the process.
    A `UsageError` where there are none: an interpreter may ship its standard library compiled
    only (``.pyc`` files, a zip), and the run stopped at "the train split is empty (train 0,
    validation 0, test 0 documents)", whose fix spoke of adding documents to data never given.
    """
    base = Path(root) if root else stdlib_root()
    docs = []
    for name, path in _stdlib_files(str(base)):
        try:
            with open(path, "rb") as file:
                text = file.read().decode("utf-8")
        except UnicodeDecodeError:
            continue
        docs.append(Document(name, text))
    if not docs:
        raise UsageError(
            f"{base}: no Python standard library sources (.py files) there, the data lowbit "
            "reads without --data (this Python ships none, or only compiled ones); fix: give "
            "your own data with --data, or use a Python installed with its library sources"
        )
    return tuple(sorted(docs, key=lambda d: d.name))


def _stdlib_files(base: str):
    """``(name, path)`` of the ``.py`` files under ``base`` that `stdlib_documents` reads: those
    in no `STDLIB_EXCLUDED_DIRS` folder, files or links to files, named by their relative path
    with forward slashes. The files that ``Path(base).rglob("*.py")`` finds (folder links not
    followed, hidden entries included, a folder that cannot be listed left out), but the
    excluded folders are never entered: rglob walked site-packages and the test suites and
    matched their ~13,000 ``.py`` files, to drop them, in ~0.4 s of every run's start."""
    folders = [("", base)]
    while folders:
        prefix, folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                found = list(entries)
        except OSError:
            continue
        for entry in found:
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in STDLIB_EXCLUDED_DIRS:
                    folders.append((f"{prefix}{entry.name}/", entry.path))
            # normcase: rglob matches "*.py" without regard to case where the file system does;
            # os.path.isfile as Path.is_file: False (not an OSError) for a link that loops
            elif os.path.normcase(entry.name).endswith(".py") and os.path.isfile(entry.path):
                yield prefix + entry.name, entry.path


def load_corpus(source: str | None = None, text_field: str = "text") -> Corpus:
    """The split corpus: the stdlib when ``source`` is None or ``"stdlib"``, else `load_texts`;
    its `Corpus.warnings` are printed to stderr by rank 0, each once per process (a study loads its
    data once per run)."""
    if source in (None, "stdlib"):
        return Corpus("stdlib", split_documents(list(stdlib_documents())))
    read = _read_texts(source, text_field)
    splits = split_documents(read.docs)
    folder = Path(os.path.expanduser(str(source)))
    listed = _unique(_folder_files(folder)) if folder.is_dir() else []  # one walk for both
    warnings = tuple(
        filter(
            None,
            [
                _skipped_files(str(source), listed),
                _compressed_files(str(source), listed),
                _skipped_binary(str(source), read.binary),
                _compressed_beside(str(source), read.beside),
                _unread_entries(str(source), read.unread),
                _lowbit_written(str(source), read.written),
                _shared_text(str(source), splits),
            ],
        )
    )
    for line in warnings:
        warn_once(line)
    return Corpus(str(source), splits, warnings)


# The shortest text (whitespace around it left out) that `_shared_text` counts as shared by splits.
SHARED_MIN_CHARS = 32


def _skipped_files(spec: str, listed: list[Path]) -> str | None:
    """The warning for a folder's text files that it is not read for (`FOLDER_SUFFIXES`): JSON
    Lines, ``.rst``, ``.csv``, code. Left out without a word, a folder of ``.txt`` and ``.jsonl``
    files trained on the ``.txt`` ones alone, and one holding a README beside its ``train.jsonl``
    on the README. ``listed``: the folder's files (`_folder_files`), none for other data."""
    folder = Path(os.path.expanduser(spec))
    skipped = [f for f in listed if f.suffix.lower() not in FOLDER_SUFFIXES and _looks_like_text(f)]
    if not skipped:
        return None
    names = [f.relative_to(folder).as_posix() for f in skipped]
    read = f"a folder is read for its {'/'.join(FOLDER_SUFFIXES)} files only"
    tables = [f for f in skipped if f.suffix.lower() in TABLE_SEPARATORS]
    if tables:  # '**/*' would train on a table as text (and a new run refuses it)
        return (
            f"{spec}: {len(skipped)} file{'s' if len(skipped) > 1 else ''} not read "
            f"({_shown(names)}): {read}; to train on a table's text, "
            f"{_table_fix(tables[0], glob=True)}"
        )
    return (
        f"{spec}: {len(skipped)} text file{'s' if len(skipped) > 1 else ''} not read "
        f"({_shown(names)}): {read}; fix: to train on them too give a glob, "
        f"--data '{(folder / '**' / '*').as_posix()}' reads every file "
        "(.jsonl ones as JSON Lines), or move them out of the folder"
    )


def _compressed_files(spec: str, listed: list[Path]) -> str | None:
    """The warning for a folder's compressed text files (`_compressed_below`), which it does not
    read: left out without a word (binary, so not named by `_skipped_files`), a folder of
    ``.txt`` files with some gzipped trained on the others alone. ``listed`` as there."""
    folder = Path(os.path.expanduser(spec))
    packed = _compressed_below(folder, listed)
    if not packed:
        return None
    return (
        f"{spec}: {len(packed)} compressed file{'s' if len(packed) > 1 else ''} not read "
        f"({_shown(packed)}): lowbit reads plain UTF-8 files; fix: {unpack_fix(folder, packed)}"
    )


def _compressed_below(folder: Path, listed: list[Path]) -> list[str]:
    """The compressed text files of ``listed``, the files below ``folder``, by relative name: a
    text or JSON Lines file's name with a compressed format's extension (`UNPACK`: ``a.txt.gz``,
    ``c4-train.00000-of-01024.json.gz``), whose unpacked file is not beside it. Not a zip
    archive, which holds files under names of their own."""
    text = (*FOLDER_SUFFIXES, *JSONL_SUFFIXES)
    return [
        p.relative_to(folder).as_posix()
        for p in listed
        if (unpacked := unpacked_path(p)) and unpacked.suffix.lower() in text
    ]


def unpacked_path(path: Path) -> Path | None:
    """The file that unpacking the compressed file ``path`` writes beside it (``a.txt.gz``:
    ``a.txt``), where ``path`` is named as one (`UNPACK`, not a zip archive, which holds files
    under names of their own) and that file is not there yet; else None."""
    if path.suffix.lower() not in UNPACK_BESIDE or path.with_suffix("").exists():
        return None
    return path.with_suffix("")


# The compressed files that `unpack_fix` names one by one; for more, a find of their suffixes.
UNPACK_LISTED = 5


def unpack_fix(folder: Path, packed: list[str]) -> str:
    """The command that unpacks the compressed files ``packed`` (names relative to ``folder``,
    none with its unpacked file beside it: `unpacked_path`) beside themselves: each format's tool
    (`UNPACK`) on the files by name, or for more than `UNPACK_LISTED` a ``find`` of their
    suffixes (``*.txt.gz``) that passes over hidden entries and files unpacked before, as the
    folder's walk does. A ``find`` of every ``*.gz`` stopped at the first file unpacked before
    (gunzip: "already exists", so ``&&`` ran no other format's) and unpacked ``.tar.gz``
    archives and hidden folders' files too."""
    by_extension: dict[str, list[str]] = {}
    for name in packed:
        by_extension.setdefault(Path(name).suffix.lower(), []).append(name)
    commands = []
    for extension, names in by_extension.items():
        if len(packed) <= UNPACK_LISTED:
            commands.append(
                " ".join([UNPACK_BESIDE[extension], *(shlex.quote(str(folder / n)) for n in names)])
            )
            continue
        suffixes = dict.fromkeys("".join(Path(name).suffixes[-2:]) for name in names)
        named = " -o ".join(f"-name {shlex.quote('*' + suffix)}" for suffix in suffixes)
        commands.append(
            f"find {shlex.quote(str(folder))} -mindepth 1 -name '.*' -prune -o \\( {named} \\) "
            f'-exec sh -c \'for f; do [ -e "${{f%.*}}" ] || {UNPACK_BESIDE[extension]} "$f"; '
            "done' sh {} +"
        )
    return f"decompress {'them' if len(packed) > 1 else 'it'}: " + " && ".join(commands)


def _compressed_beside(spec: str, beside: list[Path]) -> str | None:
    """The warning for the compressed files that a glob matched and left out, each with its
    unpacked file beside it (``beside``, `_read_texts`): read, they were "gzip-compressed; fix:
    gunzip -k" once more after ``gunzip -k``, the same error on every run."""
    if not beside:
        return None
    names = [_relative(f, _glob_base(spec)) for f in beside]
    then = _glob_of_unpacked(spec, beside)
    its, file, sits, it = (
        ("their", "files", "sit", "them") if len(beside) > 1 else ("its", "file", "sits", "it")
    )
    return (
        f"{spec}: {len(beside)} compressed {'files' if len(beside) > 1 else 'file'} not read "
        f"({_shown(names)}): lowbit reads plain UTF-8 files, and {its} unpacked {file} {sits} "
        + (
            f"beside {it}, which the glob does not match; fix: {then}"
            if then
            else f"beside {it}, read in {its} place; fix: none needed (a narrower glob leaves "
            f"{it} out without this warning)"
        )
    )


def _glob_of_unpacked(spec: str, packed: list[Path]) -> str:
    """What a glob that matched the compressed files ``packed`` needs to read the files that
    unpacking them writes beside them: nothing (``""``) where it matches those too (``data/*``),
    else the glob that does (``data/*.txt.gz``: ``--data 'data/*.txt'``)."""
    last = Path(spec).name
    if last == "**" or all(_matching(f.parent, [f.with_suffix("").name], last) for f in packed):
        return ""
    extension = next((e for e, _ in UNPACK.values() if spec.lower().endswith(e)), None)
    if extension is None:
        return "a glob that matches the files they write"
    return f"--data '{spec[: -len(extension)]}'"


def _skipped_binary(spec: str, skipped: list[str]) -> str | None:
    """The warning for the binary files that a glob matched and `load_texts` left out (a
    ``__pycache__``'s ``.pyc``, an image beside the text; ``skipped``, named as the documents
    are): ``folder/**/*``, which the warning of `_skipped_files` advises, stopped the run at the
    first of them ("not UTF-8 text (byte 0); fix: convert it to UTF-8")."""
    if not skipped:
        return None
    return (
        f"{spec}: {len(skipped)} binary file{'s' if len(skipped) > 1 else ''} not read "
        f"({_shown(skipped)}): they hold no text; fix: none if they are no data, else convert "
        "them to UTF-8 text (a narrower glob leaves them out without this warning)"
    )


def _unread_entries(spec: str, unread: dict[str, str]) -> str | None:
    """The warning for what a folder or glob reached and could not read (`_glob_files`): read
    as if absent, a folder of links into a disk not mounted trained on the files beside them."""
    if not unread:
        return None
    return f"{spec}: {_unread_list(unread)}, and any text there is left out; fix: {UNREAD_FIX}"


def _lowbit_written(spec: str, written: dict[str, str]) -> str | None:
    """The warning for the folders lowbit wrote into inside the data, which a folder or glob
    left out (`_lowbit_output`): said once, so that a user who meant to train on such files
    learns why they are not read."""
    if not written:
        return None
    return (
        f"{spec}: left out {_shown([what for _, what in sorted(written.items())], '; ')}: "
        "what lowbit writes is no data (and read, it would change as a run writes); fix: none "
        "needed, or keep --out outside the data"
    )


UNREAD_FIX = (
    "restore the links' targets (mount the disk) or the folders' permissions, or remove them"
)


def _unread_list(unread: dict[str, str]) -> str:
    """``N entries not read (name: why; ...)``, the first three named."""
    shown = _shown([f"{name}: {why}" for name, why in sorted(unread.items())], "; ")
    return f"{len(unread)} entr{'ies' if len(unread) > 1 else 'y'} not read ({shown})"


BINARY_HEAD = 8000  # the bytes of a file's start that git looks at for a NUL byte


def _head(path: Path, size: int = BINARY_HEAD) -> bytes:
    """The first ``size`` bytes of ``path``; none where it cannot be read (`read_text` names the
    error)."""
    try:
        with open(path, "rb") as file:
            return file.read(size)
    except OSError:
        return b""


def _utf8_start(head: bytes, final: bool) -> bool:
    """Whether ``head``, the start of a file (all of it where ``final``: else a character cut at
    its end is no error), is UTF-8 text: no NUL byte, not only whitespace."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=final)
    except UnicodeDecodeError:
        return False
    return b"\0" not in head and bool(head.strip())


def _binary_head(head: bytes) -> bool:
    """Whether a file starting with ``head`` (`BINARY_HEAD` bytes) holds no text, as git decides
    (a NUL byte in it), unless the NUL bytes are those of UTF-16 or UTF-32 text or of UTF-8 text
    padded with them (`_nul_kind`), and not a compressed or Parquet file nor text with a
    byte-order mark: `read_text` names those with their fix."""
    if b"\0" not in head or _compressed_kind(head) or head.startswith((*UNICODE_BOMS, PARQUET)):
        return False
    return _nul_kind(head) is None


def _compressed_kind(data: bytes) -> str | None:
    """The compressed format (`COMPRESSED`) whose magic number opens ``data``, or ``"tar"`` for
    a tar archive (`TAR_MAGIC`, after a header's NUL-padded fields: no text's "custard"), if any."""
    if data[TAR_MAGIC_AT : TAR_MAGIC_AT + len(TAR_MAGIC)] == TAR_MAGIC and 0 in data[:TAR_MAGIC_AT]:
        return "tar"
    return next((name for magic, name in COMPRESSED.items() if data.startswith(magic)), None)


def _nul_kind(data: bytes) -> str | None:
    """What the NUL bytes of ``data`` (which holds one) are: the encoding of UTF-16 or UTF-32 text
    without a byte-order mark (``"UTF-16LE"``, `_wide_encoding`), ``"stray"`` for UTF-8 text
    padded with them (a crashed log), None for a binary file; judged from the file's head, or
    from `BINARY_HEAD` bytes around the first NUL where the head holds none.

    The bytes are UTF-16 or UTF-32 text where they read as such and either NULs are a third of
    them or more (ASCII's half, or three quarters), or they all fall at every other byte
    (`_one_parity`), or the bytes are not UTF-8 text once the NULs are deleted (`_utf8_text`).
    Else they are a padded log where they are UTF-8 text so, and binary where not (ASCII reads as
    UTF-16 too, but a log's padding, a NUL run, is U+0000 characters there and falls at both
    parities, and a stray NUL is too few to be a third)."""
    first = data.index(0)
    start = 0 if first < BINARY_HEAD else (first - BINARY_HEAD // 2) // 4 * 4  # a unit's start
    window = data[start : start + BINARY_HEAD]
    utf8 = _utf8_text(window.replace(b"\0", b""), cut=start > 0)
    wide = _wide_encoding(window)
    if wide and (3 * window.count(0) >= len(window) or _one_parity(window, wide) or not utf8):
        return wide
    return "stray" if utf8 else None


# The fewest NUL bytes at one parity that `_one_parity` takes for UTF-16 text's where the other
# high bytes are of several Indic blocks.
WIDE_NULS = 8
# High bytes that `_one_parity` does not take alone for UTF-16 text's: line ends at every other
# byte are a file of one-character lines (a character vocabulary), no Gurmukhi or Malayalam.
LINE_ENDS = {0x0A, 0x0D}


def _one_parity(window: bytes, encoding: str) -> bool:
    """Whether the bytes of ``window`` (from a multiple of 4 bytes into a file) at the offsets of
    the high bytes of ``encoding``'s code units (odd ones in UTF-16LE) are all NUL or C0 control
    bytes, and none of the others NUL, as in UTF-16 text of ASCII (high byte NUL) and of the
    scripts of U+0100-U+1FFF (Greek, Cyrillic, Arabic, Indic, Thai: 0x01-0x1F). In Indic scripts
    (U+0900-U+0DFF) the letters' high bytes are tab to carriage return, so deleting the NULs
    leaves ASCII text, and without spaces the text holds no NUL to delete. Taken for UTF-16:
    `WIDE_NULS` NULs or more with the other high bytes tab to carriage return, or one block's
    high byte alone besides NULs (one script's, a one-line text's), other than a line end
    (`LINE_ENDS`). A log's padding (a NUL run) falls at both offsets, and NUL-terminated records
    of an even length, whose NULs fall at one, have letters there too."""
    highs, lows = window[1::2], window[0::2]
    if encoding.endswith("BE"):
        highs, lows = lows, highs
    blocks = set(highs) - {0}
    if not highs or 0 in lows or max(blocks, default=0) >= 0x20:
        return False
    if blocks <= set(range(0x09, 0x0E)) and highs.count(0) >= WIDE_NULS:
        return True
    return len(blocks) == 1 and not blocks & LINE_ENDS


# The fewest characters, and distinct ones, that UTF-16 text without a NUL byte
# (`_wide_without_nuls`) holds: ``a\tb\t`` read as two Devanagari letters, ``\t\t\t\t`` as one
# twice.
WIDE_MIN_CHARS = 4
WIDE_MIN_DISTINCT = 3
# The high bytes of UTF-16 code units that are white space in UTF-8 (tab, vertical tab, form
# feed: Devanagari and Bengali, Oriya and Tamil, Telugu and Kannada): between them, ASCII letters
# and digits alone are cells of a table (``x\ty\tz``), as UTF-16 they are rare letters.
SPACE_HIGHS = {0x09, 0x0B, 0x0C}


def _wide_without_nuls(data: bytes, text: str) -> tuple[str, str] | None:
    """``(encoding, reading)`` where ``data``, UTF-8 without a NUL byte that reads as ``text``,
    is likely UTF-16 text without a byte-order mark and without ASCII (`_one_parity`: a line of
    Hindi or Russian without spaces or line end), whose high bytes, C0 controls, read as UTF-8
    too: trained on, it was ``(\\t.\\t`` for "नम". Judged on the file's first `BINARY_HEAD`
    bytes: text (not white space alone) of `WIDE_MIN_CHARS` characters or more, of which
    `WIDE_MIN_DISTINCT` distinct, 90% letters or marks, read in UTF-16, and, where the high
    byte is white space in UTF-8 (`SPACE_HIGHS`), not ASCII letters and digits between them."""
    if len(data) % 2 or len(data) < 2 * WIDE_MIN_CHARS or min(data[:2]) >= 0x20:
        return None
    if not text.strip():  # a folder's file of tabs: skipped as white space
        return None
    window = data[:BINARY_HEAD]
    for encoding in ("UTF-16LE", "UTF-16BE"):
        if not _one_parity(window, encoding):
            continue
        reading = window.decode(encoding, "replace")
        letters = sum(unicodedata.category(c)[0] in "LM" for c in reading)
        high, lows = (
            (window[0], window[1::2]) if encoding == "UTF-16BE" else (window[1], window[::2])
        )
        cells = high in SPACE_HIGHS and lows.isascii() and lows.isalnum()
        if len(set(reading)) >= WIDE_MIN_DISTINCT and letters >= 0.9 * len(reading) and not cells:
            return encoding, reading
    return None


# The East Asian text that UTF-16 without a byte-order mark holds without a NUL byte (no ASCII):
# CJK punctuation, kana, ideographs, fullwidth forms, and the dashes, quotes and ellipsis of
# U+2014-U+2026 (`_utf16_guesses`); Hangul syllables in UTF-16LE only: in UTF-16BE, GBK's
# common Chinese characters (lead bytes 0xB0-0xD7) read as them.
IDEOGRAPHS = ((0x3400, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF))
CJK_SIGNS = ((0x3000, 0x30FF), (0xFF00, 0xFFEF))  # CJK punctuation, kana, fullwidth forms
EAST_ASIAN = ((0x2014, 0x2026), *CJK_SIGNS, *IDEOGRAPHS)
HANGUL = ((0xAC00, 0xD7A3),)
# The encodings before UTF-16 whose text without ASCII letters reads as ideographs in UTF-16 too
# (Shift-JIS kanji in UTF-16BE), by iconv's name, with the characters beyond ASCII that their
# text holds (`_utf16_guesses`), in the order tried: EUC-KR before Thai's CP874, GBK and Big5,
# which read its Hangul as Thai or common Chinese characters, and CP874 before GBK and Big5, which
# read Thai as Chinese characters (`THAI_MISPLACED` tells Chinese read as Thai).
FULL_CJK = ((0x3000, 0x30FF), (0xFF01, 0xFF5E), *IDEOGRAPHS)  # no halfwidth kana: Thai's bytes
EAST_ASIAN_LEGACY = {
    "SHIFT_JIS": FULL_CJK,
    "EUC-KR": HANGUL,
    "CP874": ((0x0E01, 0x0E02), (0x0E04, 0x0E04), (0x0E06, 0x0E5B)),  # Thai, not its obsolete ฃ ฅ
    "GBK": FULL_CJK,
    "BIG5": FULL_CJK,
}
# A Thai vowel or tone mark not after a consonant (or a mark), or a leading vowel before no
# consonant: no Thai text's order.
THAI_MISPLACED = re.compile(
    "(?:^|[^\u0e01-\u0e2e\u0e31\u0e34-\u0e3a\u0e47-\u0e4e])[\u0e31\u0e34-\u0e3a\u0e47-\u0e4e]"
    "|[\u0e40-\u0e44](?![\u0e01-\u0e2e])"
)
# The cp1252 characters beyond ASCII, other than letters, that Latin text holds (`_latin_text`).
TYPOGRAPHIC = frozenset("‘’‚“”„–—…•°€£¥¢©®™«»§¶±×÷½¼¾²³·¿¡\xa0")
# The characters of the start of a file that a guess shows (`_utf16_guesses`).
SHOWN_CHARS = 12


def _in_ranges(text: str, ranges) -> bool:
    """Whether every character of ``text`` is an assigned one of ``ranges``."""
    return all(
        any(low <= ord(c) <= high for low, high in ranges) and unicodedata.category(c) != "Cn"
        for c in text
    )


def _reading(head: bytes, encoding: str, final: bool) -> str | None:
    """``head`` decoded strictly from ``encoding`` (a character cut at its end forgiven unless
    ``final``: the whole file), where it holds no control character but white space; else
    None."""
    try:
        text = codecs.getincrementaldecoder(encoding)().decode(head, final=final)
    except UnicodeDecodeError:
        return None
    return text if all(c.isprintable() or c in "\t\n\r\f" for c in text) else None


def _latin_text(head: bytes, final: bool) -> str | None:
    """The cp1252 reading of ``head`` where it is Latin text: half its characters ASCII or more,
    the others letters or `TYPOGRAPHIC` (``It’s``, ``“Hi”``, ``10°C``)."""
    text = _reading(head, "cp1252", final)
    beyond = [c for c in text or "" if not c.isascii()]
    if text is None or 2 * len(beyond) > len(text):
        return None
    return text if all(c.isalpha() or c in TYPOGRAPHIC for c in beyond) else None


def _utf16_guesses(data: bytes) -> list[tuple[str, str, str]]:
    """The encodings to offer, as ``(iconv's name, how a fix names it, what it reads)``, for
    ``data``, not UTF-8 and without a NUL byte, where it reads as East Asian text (`EAST_ASIAN`,
    assigned characters only) in UTF-16LE or UTF-16BE: one line of Chinese, Japanese or Korean
    in UTF-16 holds no NUL where no character has one, and was told to convert it from cp1252.
    Offered before the UTF-16 reading, two at most in all: the cp1252 one where it is Latin text
    (`_latin_text`: ``It’s`` reads as two ideographs in UTF-16LE), and the first of
    `EAST_ASIAN_LEGACY` that reads as its script without ASCII letters (Shift-JIS kanji read as
    ideographs in UTF-16BE). None where there is no UTF-16 reading, or where the cp1252 reading's
    characters beyond ASCII are letters alone (``Café``, two ideographs in UTF-16BE). Judged on
    the file's first `BINARY_HEAD` bytes: refusing a cp1252 file of 50 MB took 3.6 s judged
    whole, 0.3 s so."""
    if len(data) % 2 or 0 in data:
        return []
    head, final = data[:BINARY_HEAD], len(data) <= BINARY_HEAD
    utf16 = None
    for encoding, scripts in (("UTF-16LE", (*EAST_ASIAN, *HANGUL)), ("UTF-16BE", EAST_ASIAN)):
        text = codecs.getincrementaldecoder(encoding)("replace").decode(head)
        if _in_ranges(text, scripts):
            utf16 = (encoding, f"{encoding} without a byte-order mark", text[:SHOWN_CHARS])
            break
    if utf16 is None:
        return []
    if all(c.isalpha() for c in head.decode("cp1252", "replace") if not c.isascii()):
        return []  # Latin-1 letters: Café, Grüße, or Cyrillic of KOI8-R
    latin = _latin_text(head, final)
    guesses = [("CP1252", "cp1252 (Windows' Latin-1)", latin[: 2 * SHOWN_CHARS])] if latin else []
    for encoding, scripts in EAST_ASIAN_LEGACY.items():
        text = _reading(head, encoding, final) or ""
        beyond = [c for c in text if not c.isascii()]
        if encoding == "CP874" and THAI_MISPLACED.search(text):
            continue
        if beyond and _in_ranges(beyond, scripts) and not re.search("[A-Za-z]", text):
            guesses.append((encoding, encoding, text[:SHOWN_CHARS]))
            break
    return [*guesses, utf16][:2]


def _utf8_text(data: bytes, cut: bool) -> bool:
    """Whether ``data``, bytes of a file (from its middle where ``cut``: up to three bytes of a
    character may open it), is UTF-8 text (`_reads_as_text`): a strict decode, which forgives
    only a character cut at either end: the bytes of a ``.pyc`` or ``.mo`` file, their NULs
    deleted and decoded with errors replaced, read as text, under 5% replacement characters."""
    if cut:
        data = data[next((i for i, b in enumerate(data[:3]) if b & 0xC0 != 0x80), 3) :]
    try:
        return _reads_as_text(codecs.getincrementaldecoder("utf-8")().decode(data))
    except UnicodeDecodeError:
        return False


def _wide_encoding(window: bytes) -> str | None:
    """The encoding, UTF-32 or else UTF-16, in which ``window`` (from a multiple of 4 bytes into a
    file) reads as text (`_reads_as_text`) with no U+0000 character, if any: ASCII reads as
    UTF-16 in both byte orders, so first in the one its NUL bytes give (an ASCII character's high
    byte: odd offsets are little-endian), then in the other (CJK text's U+4E00 puts a NUL at the
    other offsets). A ``.pyc`` or ``.mo`` file's numbers hold U+0000 (its flags, its revision at
    byte 4), though a long docstring's ASCII reads as printable UTF-16 (``Ex`` is U+4578)."""
    orders = ("UTF-16LE", "UTF-16BE")
    if window[1::2].count(0) < window[0::2].count(0):
        orders = orders[::-1]
    for encoding in ("UTF-32LE", "UTF-32BE", *orders):
        text = window.decode(encoding, "replace")
        if "\0" not in text and _reads_as_text(text):
            return encoding
    return None


def _reads_as_text(text: str) -> bool:
    """Whether ``text``, decoded bytes, is text: not only white space, and 95% or more of its
    characters printable or white space and not a replacement character (a character that the
    cut of a file's bytes split, decoded with errors replaced, is among the other 5%). Bytes of
    an image or archive decode, as UTF-16, to a mix of unassigned, private-use and control units
    (NUL among them) far below that."""
    shown = sum((c.isprintable() or c.isspace()) and c != "\ufffd" for c in text)
    return bool(text.strip()) and shown >= 0.95 * len(text)


def _looks_like_text(path: Path) -> bool:
    """Whether ``path`` starts with UTF-8 text (its first 4 KiB, `_utf8_start`), as a text
    format that a glob reads does and an image or archive does not."""
    return _utf8_start(_head(path, 4096), final=False)


def _shared_text(spec: str, splits: dict[str, list[Document]]) -> str | None:
    """The warning for validation and test documents whose text (up to line ends and whitespace
    around it: a copy saved with Windows line ends too) is also a training document's: their loss
    is then measured on text the model trained on, as with one file copied into both ``train/``
    and ``valid/``. Texts of under `SHARED_MIN_CHARS` are left out: a heading, a ``* * *`` between
    chapters, a "Thank you!" record recur in any text, and warning of them would teach users to
    skip the warning. Its fix is chosen by copy (`_copy_fix`)."""

    def key(doc: Document) -> bytes | None:  # a digest: the texts are not held twice
        text = doc.text.replace("\r\n", "\n").strip()  # not split(): 3x slower on code
        return (
            hashlib.blake2b(text.encode("utf-8")).digest()
            if len(text) >= SHARED_MIN_CHARS
            else None
        )

    train: dict[bytes | None, str] = {}
    for doc in splits["train"]:
        train.setdefault(key(doc), doc.name)
    train.pop(None, None)
    counts, example, copies = [], None, {}
    for split in ("validation", "test"):
        shared = [(doc.name, train[k]) for doc in splits[split] if (k := key(doc)) in train]
        if shared:
            counts.append(f"{len(shared)} of {len(splits[split])} {split}")
            example = example or "{} is {}".format(*shared[0])
            copies[split] = [name for name, _ in shared]
    if not counts:
        return None
    return (
        f"{spec}: {' and '.join(counts)} documents have the text of a training document "
        f"({example}), so their loss is measured on text the model trained on; "
        f"fix: {_copy_fix(splits, copies)}"
    )


def _copy_fix(splits: dict[str, list[Document]], copies: dict[str, list[str]]) -> str:
    """The fix for ``copies`` (document names by the split they fell in): removing them, where
    the data named their split (data that comes split keeps it, `_given_splits`); else removing
    the repeated text, for the documents that lowbit split by a hash of their names (one file's
    repeated paragraphs, or validation documents drawn from ``train/`` where the data names no
    validation split) have no split of their own to remove it from. Data naming its splits is
    found only here, where a copy was found (over a million JSONL records' names, seconds)."""
    named = _given_splits([doc for docs in splits.values() for doc in docs])
    kept = [split for split, names in copies.items() if any(named[n] == split for n in names)]
    drawn = any(named[n] != split for split, names in copies.items() for n in names)
    repeated = (
        "the repeated text from the training data (its validation documents are drawn from it "
        "by a hash of their names, so a copy may fall into them)"
        if any(named.values())
        else "the repeated text from the data (its documents are split by a hash of their "
        "names, so a copy may fall into any split)"
    )
    if not drawn:
        return "remove the copies from the validation and test data (the splits are kept as given)"
    if not kept:
        return f"remove {repeated}"
    return f"remove the copies from the {' and '.join(kept)} data (kept as given) and {repeated}"


def load_texts(path_or_glob: str | os.PathLike, text_field: str = "text") -> list[Document]:
    """Documents from user data, sorted by name (`_read_texts`)."""
    return _read_texts(path_or_glob, text_field).docs


@dataclass
class _Read:
    """What `_read_texts` read from user data, and what it left out, for `load_corpus`'s
    warnings: ``binary``, the names of the binary files a glob matched; ``unread`` and
    ``written``, what a folder or glob could not read and the folders lowbit wrote into
    (`_glob_files`); ``beside``, the compressed files a glob matched whose unpacked files sit
    beside them; ``records``, how many of ``docs`` are JSON records."""

    docs: list[Document] = field(default_factory=list)
    binary: list[str] = field(default_factory=list)
    unread: dict[str, str] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)
    beside: list[Path] = field(default_factory=list)
    records: int = 0


def _read_texts(path_or_glob, text_field: str) -> _Read:
    """Documents from user data, sorted by name, and what was left out (`_Read`).

    - a folder: every ``*.txt``, ``*.md``, ``*.py`` below it (not in hidden folders, not hidden;
      linked folders too, as the glob ``folder/**/*`` reads them), one document per file, named
      by relative path;
    - a glob (``data/**/*.txt``): `_glob_documents`;
    - a ``.jsonl`` or ``.json`` file: one document per line, from the string field ``text_field``
      (a ``.json`` file holding one JSON array: one document per record of the array);
    - any other single file: one document per paragraph (a block between lines holding only
      whitespace, a form feed included: a page break also ends a paragraph), so that one file still
      yields validation and test text (a ``.csv`` or ``.tsv`` table too: a new run refuses one,
      `check_not_tables`, but a run trained on one before is resumed and evaluated on it).
    """
    # an empty path would read the current folder, as `lowbit train --data ""` refuses to
    check_given(path_or_glob, "the data path")
    spec = os.path.expanduser(str(path_or_glob))  # a config file's "~/data" too
    path = Path(spec)
    read = _Read()
    if path.is_dir():
        files = _unique(
            p
            for p in _folder_files(path, read.unread, read.written)
            if p.suffix.lower() in FOLDER_SUFFIXES
        )
        read.docs = [d for f in files for d in _file_documents(f, f.relative_to(path).as_posix())]
        read.unread = _may_have_held_text(
            read.unread, lambda name: name.lower().endswith(FOLDER_SUFFIXES)
        )
    elif path.is_file():
        # the file is all the data: "remove it" is no fix (`read_text`'s ``or_else``)
        if path.suffix.lower() in JSONL_SUFFIXES:
            read.docs = _jsonl_documents(path, path.name, text_field, or_else=None)
            read.records = len(read.docs)
        else:
            read.docs = _paragraph_documents(path)
    elif glob.has_magic(spec):
        _glob_documents(spec, text_field, read)
    elif path.exists():
        raise pipe_as_data(spec)
    elif path.is_symlink():  # "no such file" of a path that `ls` lists
        raise UsageError(
            f"{spec}: a link to {os.readlink(path)}, which does not exist; fix: restore its "
            "target (mount the disk) or point at the data itself"
        )
    else:
        raise UsageError(f"{spec}: no such file, folder or glob; fix: check the data path")
    # whitespace alone is no text: files of blank lines went on to "the train split holds 23
    # tokens, fewer than one window", as if the data were merely short
    if not any(d.text.strip() for d in read.docs):
        raise _no_text(spec, text_field, read)
    read.docs.sort(key=lambda d: d.name)
    return read


def _glob_documents(spec: str, text_field: str, read: _Read) -> None:
    """Read into ``read`` the files that the glob ``spec`` matches: one document per file, named
    relative to the pattern's fixed leading folder; matched ``.jsonl`` files are read as JSONL,
    ``.json`` ones where the pattern ends with ``.json``, binary files (`_binary_head`: an image,
    a ``.pyc``) are left out, and so are compressed files whose unpacked file sits beside them,
    while one without is refused with the command that unpacks it (a file that links make the
    glob reach under several names is read once, under the first)."""
    base = _glob_base(spec)
    files, packed = [], []
    matched = _unique(_glob_files(spec, read.unread, read.written))
    last = Path(spec).name
    read.unread = _may_have_held_text(read.unread, lambda name: fnmatch.fnmatch(name, last))
    for f in matched:
        head = _head(f)
        if _binary_head(head):
            read.binary.append(_relative(f, base))
        elif (kind := _compressed_kind(head)) in UNPACK and f.suffix.lower() == UNPACK[kind][0]:
            if kind == "zip":  # an archive of its own names: read, refused with its unzip
                files.append(f)
            else:
                (packed if unpacked_path(f) else read.beside).append(f)
        else:
            files.append(f)
    if packed:  # read, the first was refused: "fix: gunzip -k it, and give the file it writes"
        names = [_relative(f, base) for f in packed]
        then = _glob_of_unpacked(spec, packed)
        raise UsageError(
            f"{spec}: matches {len(packed)} compressed file{'s' if len(packed) > 1 else ''} "
            f"({_shown(names)}), and lowbit reads plain UTF-8 files; fix: "
            f"{unpack_fix(base, names)}" + (f", then {then}" if then else "")
        )
    # .jsonl files are records; .json ones only where the pattern asks for them (data/*.json):
    # a glob over a code tree ('src/**/*') reads its package.json as text, as it always did
    as_records = (".jsonl", ".json") if spec.lower().endswith(".json") else (".jsonl",)
    for f in files:
        name = _relative(f, base)
        if f.suffix.lower() in as_records:
            read.docs += (found := _jsonl_documents(f, name, text_field))
            read.records += len(found)
        else:
            read.docs += _file_documents(f, name)


def _no_text(spec: str, text_field: str, read: _Read) -> UsageError:
    """The error for data ``spec`` that `_read_texts` read no text from (``read``), naming what
    it holds instead where that is known."""
    path, docs = Path(spec), read.docs
    holds_none = (
        f"{spec}: a folder is read for its {'/'.join(FOLDER_SUFFIXES)} files and holds none"
    )
    if path.is_dir() and (jsonl := _jsonl_below(path)):
        pattern = (path / "**" / f"*{jsonl.suffix}").as_posix()
        return UsageError(
            f"{holds_none}, only JSON Lines such as {jsonl.relative_to(path).as_posix()}; fix: "
            f"give a glob for those, --data '{pattern}'"
        )
    if path.is_dir() and (packed := _compressed_below(path, _unique(_folder_files(path)))):
        return UsageError(
            f"{holds_none}, only compressed ones ({_shown(packed)}); fix: "
            f"{unpack_fix(path, packed)}"
        )
    if path.is_dir() and (tables := _tables_below(path)):
        return UsageError(
            f"{holds_none}, only tables ({_shown(tables)}); fix: {_table_fix(path / tables[0])}"
        )
    if docs and read.records == len(docs):  # a JSONL file, or a glob of them
        return UsageError(  # it was "fix: point at ... a JSONL file with a 'text' field"
            f"{spec}: the {text_field!r} field of all {len(docs)} records is empty or "
            "whitespace; fix: name the field that holds the text with --text-field"
        )
    if read.beside and not docs:  # 'data/*.gz' after gunzip -k: only what it leaves out
        names = [_relative(f, _glob_base(spec)) for f in read.beside]
        return UsageError(
            f"{spec}: matches only compressed files ({_shown(names)}), "
            "whose unpacked files sit beside them, and lowbit reads plain UTF-8 files; fix: "
            f"{_glob_of_unpacked(spec, read.beside)}"
        )
    if read.written and not docs:  # 'run/**/*.jsonl', which matched only the run's metrics
        return UsageError(
            f"{spec}: no text read, only what lowbit wrote "
            f"({'; '.join(what for _, what in sorted(read.written.items()))}), which is no "
            "data; fix: point at the data itself"
        )
    if read.unread and not docs:  # a folder that cannot be listed, links to an unmounted disk
        return UsageError(f"{spec}: no text read, {_unread_list(read.unread)}; fix: {UNREAD_FIX}")
    if read.binary and not docs:  # a glob of images, say: "matches files" was its fix
        return UsageError(
            f"{spec}: every file it matches is binary ({_shown(read.binary)}); fix: a glob of "
            "the UTF-8 text files"
        )
    # text files read, all empty or blank: their fix was to point at the UTF-8 .txt files they are
    if path.is_file():
        held = _held_instead(path.read_bytes())
        return UsageError(f"{spec}: the file holds {held}, no text; fix: give a file of text")
    if docs:  # a paragraph's or a record's name is its file's, then ':' and a number
        files = {re.sub(r":#?\d+$", "", doc.name) for doc in docs}
        return UsageError(
            f"{spec}: all {len(files)} files it reads hold only whitespace or nothing, no text; "
            "fix: give files of text"
        )
    return UsageError(
        f"{spec}: no text found; fix: point at UTF-8 {'/'.join(FOLDER_SUFFIXES)} files, "
        f"a JSONL file with a {text_field!r} field, or a glob that matches files"
    )


def _held_instead(raw: bytes) -> str:
    """What a file of no text holds (``raw``, its bytes), as `_no_text` names it: a .json
    file's ``[]`` is an empty JSON array, and a UTF-8 byte-order mark alone no whitespace."""
    size = f"{len(raw):,} bytes"
    if not raw:
        return "nothing (0 bytes)"
    if raw == codecs.BOM_UTF8:
        return f"only a byte-order mark ({size})"
    if re.fullmatch(rb"\s*\[\s*\]\s*", raw.removeprefix(codecs.BOM_UTF8)):
        return f"an empty JSON array ({size})"
    return f"only whitespace ({size})"


# Table files by their separator: data exported from a spreadsheet or a dataframe. Read as plain
# text, a table trained on its header, ids and separators, and as one paragraph without blank
# lines it stopped at "the validation split is empty", whose fix spoke of paragraphs.
TABLE_SEPARATORS = {".csv": ",", ".tsv": "\t"}


# The most of a table's first line read for its column names: its header, not the whole file
# (a 310 MB CSV was decoded whole, 6.9 s and 837 MB, for its first line).
TABLE_HEADER_CHARS = 1 << 16


def check_not_tables(source: str | None) -> None:
    """Refuse the --data of a NEW run that is a CSV or TSV table (`TABLE_SEPARATORS`), or a glob
    that matches one (``data/*.csv``, or ``data/*`` over a folder holding tables), with its columns
    and the command that writes its rows as JSON Lines. Read as plain text, a table trained on its
    header, ids and separators. Only a new run's choice is refused: `load_corpus` reads a table
    as text, so that a run trained on one before is still resumed, evaluated and pruned on it
    (renamed ``.txt``, its fingerprint, which names its files, no longer matched)."""
    if source in (None, "stdlib"):
        return
    spec = os.path.expanduser(str(source))
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in TABLE_SEPARATORS:
        raise UsageError(f"{path}: {_table_columns(path)}; fix: {_table_fix(path)}")
    if path.exists() or not glob.has_magic(spec):
        return  # a folder reads no tables (`_skipped_files` names them)
    tables = [f for f in _unique(_glob_files(spec)) if f.suffix.lower() in TABLE_SEPARATORS]
    if tables:
        names = [_relative(f, _glob_base(spec)) for f in tables]
        raise UsageError(
            f"{spec}: matches {len(tables)} table{'s' if len(tables) > 1 else ''} "
            f"({_shown(names)}), the first {_table_columns(tables[0])}; fix: "
            f"{_table_fix(tables[0], glob=True)}"
        )


def check_quickly(source: str | None, text_field: str = "text") -> None:
    """What `load_corpus` refuses that shows without reading all of the data, for the `--nproc`
    launcher, whose ranks then read it (read and fingerprinted there, the data took ~2 minutes a
    GB before any rank started, on every start): the path exists and a folder or glob finds files,
    the first of them holds text, not NUL bytes, and a JSON Lines file's first record has
    ``text_field``. Data that fails one of these is read in full (`_read_texts`), for the very
    error the run gives, or none where the rest of it reads. Nothing is warned: the ranks warn."""
    if source in (None, "stdlib"):
        return
    spec = os.path.expanduser(str(source))
    path = Path(spec)
    if path.is_dir():
        files = [p for p in _folder_files(path) if p.suffix.lower() in FOLDER_SUFFIXES]
    elif path.is_file():
        files = [path]
    elif glob.has_magic(spec) and not path.exists():
        files = _glob_files(spec)
    else:
        files = []
    if not files or not _starts_readable(files[0], text_field):
        _read_texts(source, text_field)


def _starts_readable(path: Path, text_field: str) -> bool:
    """Whether the first 64 KiB of ``path`` (`TABLE_HEADER_CHARS` bytes) hold UTF-8 text and,
    for a JSON Lines file, a first record with the string field ``text_field``
    (`check_quickly`)."""
    head = _head(path, TABLE_HEADER_CHARS)
    # not: read in full for the error the run gives (byte, line, iconv)
    if not _utf8_start(head, final=len(head) < TABLE_HEADER_CHARS):
        return False
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return True
    line = next(line for line in head.split(b"\n") if line.strip())
    try:
        record = json.loads(line)
    except ValueError:  # a first line longer than the head, a .json array: read in full
        return False
    return isinstance(record, dict) and isinstance(_field(record, text_field)[0], str)


def _shown(names: list[str], separator: str = ", ") -> str:
    """Up to three of ``names``, for a one-line message."""
    return separator.join(names[:3]) + (f"{separator}..." if len(names) > 3 else "")


def _table_columns(path: Path) -> str:
    """What a table is, with its columns (its first line's), to pick ``--text-field`` from."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as file:
            first = file.readline(TABLE_HEADER_CHARS).rstrip("\r\n")
    except OSError:
        first = ""
    separator = TABLE_SEPARATORS[path.suffix.lower()]
    header = next(csv.reader([first], delimiter=separator), [])
    columns = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
    return (
        f"a {path.suffix[1:].upper()} table (columns: {columns or 'none'}), which read as plain "
        "text would train on its header, ids and separators"
    )


def _table_fix(path: Path, glob: bool = False) -> str:
    """The fix for a table: the command that writes its rows as JSON Lines (Python's own csv
    module: no package to install; ``python3``, which stock Debian and Ubuntu have and ``python``
    they lack)."""
    separator = TABLE_SEPARATORS[path.suffix.lower()]
    code = (
        "import csv, json, sys; [print(json.dumps(r, ensure_ascii=False)) for r in "
        f"csv.DictReader(open(sys.argv[1], newline='', encoding='utf-8-sig'), "
        f"delimiter={separator!r})]"
    )
    jsonl = shlex.quote(str(path.with_suffix(".jsonl")))
    given = (
        "give a glob of such files that matches no table"
        if glob
        else f"give that file ({jsonl}) as --data"
    )
    return (
        f'write its rows as JSON Lines with python3 -c "{code}" {shlex.quote(str(path))} > '
        f"{jsonl} and {given} with --text-field COLUMN, or rename it .txt to train on it as plain "
        "text"
    )


def _tables_below(folder: Path) -> list[str]:
    """The tables below ``folder`` (not hidden), by relative name: a folder does not read them."""
    found = sorted(_folder_files(folder))
    return [p.relative_to(folder).as_posix() for p in found if p.suffix.lower() in TABLE_SEPARATORS]


def _jsonl_below(folder: Path) -> Path | None:
    """The first JSON Lines file below ``folder`` (not hidden), if any."""
    found = (p for p in sorted(_folder_files(folder)) if p.suffix.lower() in JSONL_SUFFIXES)
    return next(found, None)


def _folder_files(
    folder: Path, unread: dict[str, str] | None = None, written: dict[str, str] | None = None
) -> list[Path]:
    """The files below ``folder`` that the glob ``folder/**/*`` reads: not hidden, and through
    folder links too (``unread`` and ``written`` as `_glob_files`). ``Path.rglob`` does not
    enter a linked folder, so a sub-corpus linked in from another disk was left out of a
    folder, without a word, that its glob read."""
    return _glob_files(os.path.join(glob.escape(str(folder)), "**", "*"), unread, written)


def _unique(files) -> list[Path]:
    """``files`` sorted, each real file once under its first name: a link to a file of the data,
    or a folder link that a glob's ``**`` follows, names the same text again."""
    seen: set[str] = set()
    out = []
    for f in sorted(files):
        real = os.path.realpath(f)
        if real not in seen:
            seen.add(real)
            out.append(f)
    return out


def _glob_files(
    pattern: str, unread: dict[str, str] | None = None, written: dict[str, str] | None = None
) -> list[Path]:
    """The files that ``glob.glob(pattern, recursive=True)`` matches (hidden names only where the
    pattern spells their dot), except that ``**`` does not enter a folder link back to a folder it
    is inside: glob follows such a loop ~40 folders deep, and two loops multiply into hours; and
    that a wildcard does not match what lowbit wrote inside the data (`_lowbit_output`).

    ``unread`` receives, by name relative to the pattern's fixed folder, what the walk reached
    and could not read: a link to nothing (a disk not mounted, a target moved) and a folder it
    may not list (permission denied). glob passes both over without a word, and the run trained
    on part of the data. ``written`` receives, by the same names, the folders that lowbit wrote
    into and what of them was left out."""
    base, rest = _glob_split(pattern)
    found: list[Path] = []
    lost = {} if unread is None else unread
    ours = {} if written is None else written

    def listed(folder: Path, part: str) -> list[Path]:
        name = f"{_relative(folder, base)}/" if folder != base else str(folder)
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):  # a glob's folder that is not there
            return []
        except OSError as error:
            if folder.name == "lost+found":  # a disk's root-only folder of fsck's: no data
                return []
            lost[name] = f"cannot list it: {error.strerror}"
            return []
        output = _lowbit_output(folder, names, folder == base, name)
        if output is not None:
            ours[name], left_out = output
            names = [n for n in names if n not in left_out]
        return _matching(folder, names, part)

    def add(entry: Path, last: bool) -> None:  # last: the pattern's last part matched it
        if last and entry.is_file():
            found.append(entry)
        elif entry.is_symlink() and not entry.exists():  # it may have been a folder to enter
            lost[_relative(entry, base)] = f"a link to {os.readlink(entry)}, which does not exist"

    def walk(folder: Path, rest: tuple[str, ...], inside: frozenset[str]) -> None:
        head, tail = rest[0], rest[1:]
        if head == "**":  # zero or more folders
            if tail:
                walk(folder, tail, inside)
            for entry in listed(folder, "*"):
                if entry.is_dir():
                    real = os.path.realpath(entry)
                    if real not in inside:
                        walk(entry, rest, inside | {real})
                else:
                    add(entry, not tail)
            return
        entries = listed(folder, head) if glob.has_magic(head) else [folder / head]
        for entry in entries:
            if tail and entry.is_dir():
                walk(entry, tail, inside | {os.path.realpath(entry)})
            else:
                add(entry, not tail)

    walk(base, rest, frozenset({os.path.realpath(base)}))
    return found


def _lowbit_output(
    folder: Path, names: list[str], top: bool, shown: str
) -> tuple[str, set[str]] | None:
    """What lowbit wrote into ``folder`` (whose entries are ``names``; ``top``: the folder the
    data walk starts from; ``shown``: its name in messages), as ``(what it is, the names it
    wrote)``, or None.

    A training run's folder (a run.json of lowbit's, or a config.yaml beside a checkpoint) loses
    only the names a run writes (`RUN_FILES`, `RUN_FOLDERS`): ``--out data --overwrite`` leaves
    the user's files there beside them. A quantize, prune or export folder (its manifest) is
    lowbit's alone, unless the user points the data at it. Read as data, ``--out data/run``
    with ``--data 'data/**/*'`` trained the resumed run on its own config, metrics and
    checkpoints (or refused it: "step-0000002.pt: zip-compressed, not text"), and a folder of
    .txt files on a saved tokenizer's merges.txt: data that changed as the run wrote.

    A `lowbit compare` folder (its settings, `_json_keys`) is lowbit's alone as well: its
    report.md was read as text from a data folder, and with a glob its report and JSON records
    too. So are the files `lowbit doctor` writes (doctor.json beside its heat map) and the records
    compare writes into its runs, in a folder that may hold the user's files beside them."""
    # imported here: lowbit.train, lowbit.infer and lowbit.report build on this module
    from lowbit.diagnostics.doctor import OUTPUT_FILES as DOCTOR_FILES
    from lowbit.infer.io import MANIFESTS
    from lowbit.report.compare import LOAD, RECORD, SETTINGS
    from lowbit.train import checkpoint
    from lowbit.train.config import RUN_INFO, read_run_info
    from lowbit.train.trainer import RUN_FILES, RUN_FOLDERS

    if not top and set(MANIFESTS).intersection(names):
        return f"{shown}, a lowbit quantize, prune or export folder", set(names)
    if not top and SETTINGS in names and _json_keys(folder / SETTINGS) >= _COMPARE_KEYS:
        return f"{shown}, a lowbit compare folder", set(names)
    run = RUN_INFO in names and "lowbit" in read_run_info(folder)
    if run or ("config.yaml" in names and checkpoint.latest(folder) is not None):
        ours = {*RUN_FILES, *RUN_FOLDERS, LOAD, RECORD}.intersection(names)
        return f"the lowbit run in {shown} ({', '.join(sorted(ours))})", ours
    if DOCTOR_FILES[0] in names and _json_keys(folder / DOCTOR_FILES[0]) >= _DOCTOR_KEYS:
        ours = set(DOCTOR_FILES).intersection(names)
        return f"the lowbit doctor output in {shown} ({', '.join(sorted(ours))})", ours
    return None


# Keys that tell the JSON files lowbit writes from a user's file of the same name: a compare
# folder's settings (`lowbit.report.compare.Study.settings`) and doctor.json (`Diagnosis.to_json`)
_COMPARE_KEYS = {"recipes", "seeds", "baseline", "base"}
_DOCTOR_KEYS = {"recipe", "probe_steps", "rows", "override_flags"}
# Larger files are no settings or table of lowbit's (a data set under that name): not read whole
_MARKER_BYTES = 64 * 2**20


def _json_keys(path: Path) -> set[str]:
    """The keys of the JSON object in ``path``; none where it holds no such object or is larger
    than lowbit's own files (`_MARKER_BYTES`)."""
    try:
        if path.stat().st_size > _MARKER_BYTES:
            return set()
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(value) if isinstance(value, dict) else set()


def _may_have_held_text(unread: dict[str, str], read) -> dict[str, str]:
    """``unread`` without the links to nothing whose file the data would not have read anyway
    (``read(file name)`` False: a ``weights.bin`` beside the ``.txt`` files), which lose no
    text; a link without a suffix may have been a folder, and stays."""
    return {
        name: why
        for name, why in unread.items()
        if not why.startswith("a link to") or not Path(name).suffix or read(Path(name).name)
    }


def _relative(path: Path, base: Path) -> str:
    """``path``'s name relative to ``base`` with forward slashes, as documents are named."""
    return os.path.relpath(path, base).replace(os.sep, "/")


def _matching(folder: Path, names: list[str], pattern: str) -> list[Path]:
    """The entries of ``folder`` (named ``names``) whose name matches ``pattern``, hidden ones
    only if it starts with a dot (as `glob` does)."""
    if not pattern.startswith("."):
        names = [n for n in names if not n.startswith(".")]
    return [folder / n for n in fnmatch.filter(names, pattern)]


def _glob_base(pattern: str) -> Path:
    """The folder of ``pattern``'s parts before its first wildcard (``.`` where none)."""
    return _glob_split(pattern)[0]


def _glob_split(pattern: str) -> tuple[Path, tuple[str, ...]]:
    """``pattern``'s fixed folder (`_glob_base`) and its parts from the first wildcard on."""
    parts = Path(pattern).parts
    first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return Path(*parts[:first]), parts[first:]


# Leading bytes of the compressed files datasets come in (The Pile's .jsonl.zst, C4's .json.gz):
# "not UTF-8 text (byte 1)" told a user holding one to convert its encoding.
COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}
# A tar archive's magic number and its offset (POSIX and GNU tar write it in each file's header).
# An archive of text files is UTF-8 text padded with NULs: a glob that matched one stopped at
# "delete them (tr -d '\000' < docs.tar > docs.clean.tar)", which made one text of its headers.
TAR_MAGIC, TAR_MAGIC_AT = b"ustar", 257
# Each compressed format's file extension and the command that unpacks a file beside itself.
UNPACK = {
    "gzip": (".gz", "gunzip -k"),
    "bzip2": (".bz2", "bunzip2 -k"),
    "xz": (".xz", "unxz -k"),
    "zstd": (".zst", "unzstd"),
    "zip": (".zip", "unzip"),
}
# The tool of each compressed format that unpacks a file beside itself, by extension: not zip's,
# an archive of files under names of their own.
UNPACK_BESIDE = {extension: tool for kind, (extension, tool) in UNPACK.items() if kind != "zip"}
# The suffixes a compressed file is named with: `UNPACK`'s and their other spellings.
PACKED_SUFFIXES = (*(extension for extension, _ in UNPACK.values()), ".gzip", ".bzip2", ".zstd")


# Apache Parquet's magic number, which opens and closes its files: the Hugging Face Hub serves
# every dataset as Parquet, and "holds NUL bytes ...; fix: convert it to UTF-8" sent a user
# holding one to iconv.
PARQUET = b"PAR1"


# Byte-order marks of the Unicode encodings other than UTF-8 (Windows Notepad's "Unicode" is
# UTF-16 LE), UTF-32's first: its little-endian mark starts with UTF-16's.
UNICODE_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32LE",
    b"\x00\x00\xfe\xff": "UTF-32BE",
    b"\xff\xfe": "UTF-16LE",
    b"\xfe\xff": "UTF-16BE",
}


# The fix besides converting it for a file of a folder's or glob's data (`read_text`'s or_else).
LEAVE_OUT = "remove it"


def read_text(path: Path, *, or_else: str | None = LEAVE_OUT) -> str:
    """The text of a UTF-8 file without its leading byte-order mark, if any (editors on Windows
    write one; it is no part of the text); a `UsageError` if the file is not UTF-8 or unreadable.
    ``or_else``: the fix besides converting it (a folder's or glob's file can be left out; a
    --config file or the one file of --data, None, cannot).

    A NUL byte is refused too: it is valid UTF-8 but no text holds one, while binary files and
    UTF-16 text do (ASCII in UTF-16 without a byte-order mark decodes as UTF-8 with a NUL after
    each letter, and trained as such without a word)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        fix = "check the path"
        if isinstance(error, PermissionError):  # "check the path" of a file that is there
            fix = f"make it readable (chmod u+r {shlex.quote(str(path))})" + (
                f" or {or_else}" if or_else else ""
            )
        raise UsageError(f"{path}: cannot read ({error.strerror}); fix: {fix}") from None
    return decode_text(path, data, or_else=or_else)


# `decode_text`'s path for bytes read from standard input (``lowbit generate --prompt-file -``),
# told by identity: its fixes pipe the bytes through a command instead of naming a file.
STANDARD_INPUT = Path("standard input")


def decode_text(path: Path, data: bytes, *, or_else: str | None = LEAVE_OUT) -> str:
    """The text of ``data``, the bytes read from the file ``path`` (or from `STANDARD_INPUT`),
    with `read_text`'s checks, errors and fixes (``or_else`` as there): for a file read otherwise
    (``lowbit generate --prompt-file``)."""
    try:
        kind = _file_format(data)
        if kind and path is STANDARD_INPUT:  # its fixes name the file to unpack
            raise UsageError(f"{path}: a {kind}, not text; fix: give the text itself, in UTF-8")
        if kind == "Parquet file":
            jsonl = str(path.with_suffix(".jsonl"))
            raise UsageError(
                f"{path}: a Parquet file, not text; fix: write its records as JSON Lines and "
                'give that file (python -c "import pandas; pandas.read_parquet('
                f"{str(path)!r}).to_json({jsonl!r}, orient='records', lines=True, "
                'force_ascii=False)")'
            )
        if kind == "tar archive":  # its NULs are no text's: refused before decoding
            raise UsageError(_compressed_error(path, "tar", or_else))
        # decoded as plain UTF-8, not utf-8-sig, so that the error's byte offset counts the BOM
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        kind = _compressed_kind(data)
        if kind is not None:
            raise UsageError(_compressed_error(path, kind, or_else)) from None
        encoding = next((name for bom, name in UNICODE_BOMS.items() if data.startswith(bom)), None)
        if encoding is not None:  # iconv's UTF-16 reads the mark for the byte order, drops it
            raise _unicode_error(path, f"{encoding} text", encoding[:-2], or_else) from None
        if 0 in data and (kind := _nul_kind(data)) != "stray" and not _padded_text(data, kind):
            raise _nul_error(path, data, kind, or_else) from None
        raise UsageError(_not_utf8(path, data, error.start, or_else)) from None
    if "\0" in text:
        kind = _nul_kind(data)
        if kind == "stray":  # UTF-8 text but for NUL bytes (a log's padding)
            raise _stray_nuls(path, data, or_else)
        raise _nul_error(path, data, kind, or_else)
    if wide := _wide_without_nuls(data, text):
        encoding, reading = wide
        guess = (encoding, f"{encoding} without a byte-order mark", reading[:SHOWN_CHARS])
        problem = f"{path}: every other byte a control character ({text[:8]!r} as UTF-8)"
        raise UsageError(_guessed_fix(problem, [guess], path, or_else))
    return text


def _file_format(data: bytes) -> str | None:
    """``"Parquet file"``, ``"tar archive"`` or ``"zip archive"`` where ``data`` is one: files of
    files, whose fixes (`_compressed_error`) name the file to unpack."""
    if data.startswith(PARQUET) and data.endswith(PARQUET):
        return "Parquet file"
    kind = _compressed_kind(data)
    return f"{kind} archive" if kind in ("tar", "zip") else None


def _stray_nuls(path: Path, data: bytes, or_else: str | None) -> UsageError:
    """The error for UTF-8 text but for NUL bytes (a log's padding, `_nul_kind`'s ``"stray"``),
    with the ``tr`` command that deletes them, or that makes them line ends where they fall
    one by one (records that ``find -print0`` separated)."""
    first = data.index(0)
    line = data.count(b"\n", 0, first) + 1
    fix, tr = "if the rest is its text, delete them", "tr -d '\\000'"
    if data.count(0) > 1 and not re.search(b"[\0\n]\0|\0\n", data):  # no NUL run
        fix, tr = "if they separate its records, make them line ends", "tr '\\000' '\\n'"
    if path is STANDARD_INPUT:
        command = f"pipe it through {tr})"
    else:
        clean = shlex.quote(str(_beside(path, "clean")))
        command = f"{tr} < {shlex.quote(str(path))} > {clean}) and use that file in its place"
    return UsageError(
        f"{path}: holds NUL bytes (byte {first}, line {line}), which no text has, amid UTF-8 "
        f"text; fix: {fix} ({command}" + (f"; or {or_else}" if or_else else "")
    )


# The fewest NUL bytes a run of them holds on average in a log's padding (`_padded_text`).
PAD_RUN = 16


def _padded_text(data: bytes, kind: str | None) -> bool:
    """Whether ``data``, not UTF-8 and whose NUL bytes are not UTF-8 text's (`_nul_kind`:
    ``kind``), is text of another encoding padded with NULs (a crashed cp1252 log): no UTF-16 or
    UTF-32 text, NULs in runs of `PAD_RUN` on average (a ``.pyc`` file's fall one to three
    apart, in its numbers), and text (`_reads_as_text`) in cp1252 once they are deleted; judged
    on `BINARY_HEAD` bytes from before the first NUL (a refused file of 200 MB took 25 times as
    long judged whole)."""
    if kind is not None:
        return False
    first = data.index(0)
    window = data[max(0, first - BINARY_HEAD // 2) : first + BINARY_HEAD // 2]
    runs = len(re.findall(b"\0+", window))
    return window.count(0) >= PAD_RUN * runs and _reads_as_text(
        window.replace(b"\0", b"").decode("cp1252", "replace")
    )


def _nul_error(path: Path, data: bytes, encoding: str | None, or_else: str | None) -> UsageError:
    """The error for a file whose NUL bytes are not a log's padding (`_nul_kind`): UTF-16 or
    UTF-32 text without a byte-order mark (``encoding``), with the iconv command that converts
    it (the cp1252 guess of `_not_utf8` that it got kept a NUL after each letter of "Grüße"),
    or a binary file (None): an image named .txt, which no encoding converts."""
    first = data.index(0)
    if encoding is None:
        return UsageError(
            f"{path}: a binary file (a NUL byte at offset {first}), not text; fix: "
            + (or_else or "give a UTF-8 text file")
        )
    found = f"holds NUL bytes (byte {first}): {encoding} text without a byte-order mark"
    return _unicode_error(path, found, encoding, or_else)


def _unicode_error(path: Path, found: str, encoding: str, or_else: str | None) -> UsageError:
    """The error for UTF-16 or UTF-32 text (``found``: what tells it), with the iconv command
    that converts it from ``encoding``."""
    return UsageError(
        f"{path}: {found}, not UTF-8; fix: convert it to UTF-8: "
        + _rewrite_fix(path, f"iconv -f {encoding} -t UTF-8", "utf8", or_else)
    )


def _compressed_error(path: Path, kind: str, or_else: str | None) -> str:
    """The error for a compressed file (``kind``, `COMPRESSED`), with the command that unpacks
    it (`UNPACK`). One not named with its format's extension (a gzipped ``a.txt``) is unpacked
    to standard output (``gunzip -c``): ``gunzip -k a.txt`` refuses it ("unknown suffix"). A tar
    archive (``kind`` ``"tar"``), like a zip one, holds files under names of its own."""
    if kind == "tar":
        return (
            f"{path}: a tar archive, not text; fix: unpack it (lowbit reads plain UTF-8 files): "
            f"tar -xf {shlex.quote(str(path))}, and give the files it writes"
        )
    extension, unpack = UNPACK[kind]
    problem = (
        f"{path}: {kind}-compressed, not text; fix: decompress it (lowbit reads plain UTF-8 "
        "files): "
    )
    if kind == "zip" or path.suffix.lower() == extension:  # unzip reads any name
        return f"{problem}{unpack} {shlex.quote(str(path))}, and give the file it writes"
    tool = unpack.split()[0]  # gunzip, bunzip2, unxz, unzstd: each writes to stdout with -c
    return problem + _rewrite_fix(path, f"{tool} -c", "unpacked", or_else)


def _rewrite_fix(path: Path, command: str, tag: str, or_else: str | None, then: str = "") -> str:
    """The fix that writes ``path`` converted by ``command`` (``iconv -f CP1252 -t UTF-8``,
    ``gunzip -c``), piped through ``then`` where given (``| tr -d '\\000'``), to the file beside it
    named with ``tag`` (`_beside`); for `STANDARD_INPUT`, the pipe through them."""
    if path is STANDARD_INPUT:
        return f"pipe it through {command}{then}" + (f"; or {or_else}" if or_else else "")
    out = shlex.quote(str(_beside(path, tag)))
    return f"{command} {shlex.quote(str(path))}{then} > {out}, and use that file in its place" + (
        f"; or {or_else}" if or_else else ""
    )


def _beside(path: Path, tag: str) -> Path:
    """The file beside ``path`` that a fix writes, named with ``tag`` (``a.utf8.txt``; a
    compressed file's name without the compression suffix of `PACKED_SUFFIXES`:
    ``d.unpacked.jsonl`` for ``d.jsonl.zstd``, whose fix wrote ``d.jsonl.unpacked.zstd``, read
    as one raw paragraph), numbered where that file is there (``a.utf8.2.txt``): a fix
    overwrites no file."""
    name = path.with_suffix("") if path.suffix.lower() in PACKED_SUFFIXES else path
    out, number = path.with_name(f"{name.stem}.{tag}{name.suffix}"), 2
    while out.exists():
        out, number = path.with_name(f"{name.stem}.{tag}.{number}{name.suffix}"), number + 1
    return out


def _not_utf8(path: Path, data: bytes, start: int, or_else: str | None) -> str:
    """The error for a file that is not UTF-8 at byte ``start``: the byte and its line, and the
    iconv command that converts it. "fix: convert it to UTF-8" said neither how nor from what.
    No encoding can be told from the bytes for sure (any bytes read as Latin-1 text), so cp1252
    (Windows' Latin-1, the usual one) is offered as a guess only where the whole file reads as
    cp1252 and the byte is what it shows there for the user to judge; a file that holds UTF-8
    text before the byte mixes encodings, which no conversion of the whole file mends."""
    byte, line = data[start], data.count(b"\n", 0, start) + 1
    where = f"byte 0x{byte:02x} at offset {start}, line {line}"
    problem, fix, then = f"{path}: not UTF-8 text ({where})", "convert it", ""
    if guesses := _utf16_guesses(data):
        return _guessed_fix(problem, guesses, path, or_else)
    if not data[:start].removeprefix(b"\xef\xbb\xbf").isascii():
        return (
            f"{path}: not UTF-8 text ({where}) after UTF-8 text: the file mixes encodings; fix: "
            f"retype line {line}'s text (and any other line refused so) in UTF-8"
            + (f", or {or_else}" if or_else else "")
        )
    try:
        shown = data.decode("cp1252")[start]
        encoding = "CP1252"
        guess = f", cp1252 (Windows' Latin-1) if {shown!r} belongs there (a guess)"
    except UnicodeDecodeError:
        named = "-" if path is STANDARD_INPUT else shlex.quote(str(path))
        encoding, guess = "ENCODING", f" (file -i {named} may tell which)"
    if 0 in data:  # a log padded with NULs (`_padded_text`): iconv keeps them
        problem += f", and NUL bytes (byte {data.index(0)}), as a crashed log's padding"
        fix, then = "delete the NULs and convert it", " | tr -d '\\000'"
    return f"{problem}; fix: {fix} from the encoding it was written in{guess}: " + _rewrite_fix(
        path, f"iconv -f {encoding} -t UTF-8", "utf8", or_else, then
    )


def _guessed_fix(
    problem: str, guesses: list[tuple[str, str, str]], path: Path, or_else: str | None
) -> str:
    """``problem`` with the fix that converts ``path`` from the first of ``guesses`` (``(iconv's
    name, how the fix names it, what it reads)``), naming the others for ``-f``: one line."""
    readings = " or ".join(f"{named} if it reads {shown!r}" for _, named, shown in guesses)
    which = "a guess" if len(guesses) == 1 else "guesses: give iconv -f the one that reads right"
    return (
        f"{problem}; fix: convert it from the encoding it was written in, {readings} ({which}): "
        + _rewrite_fix(path, f"iconv -f {guesses[0][0]} -t UTF-8", "utf8", or_else)
    )


def read_lines(path: Path, *, or_else: str | None = LEAVE_OUT) -> list[str]:
    """The lines of `read_text` (``or_else`` as there), each with its end, cut after line feeds
    only (a carriage return before one stays: whitespace to the callers). `str.splitlines` would
    also cut at U+2028, U+0085, form feed and other characters that JSON leaves unescaped inside
    strings, and would number lines differently from an editor."""
    return split_lines(read_text(path, or_else=or_else))


def split_lines(text: str) -> list[str]:
    """``text``'s lines as `read_lines` cuts them (after line feeds only, each with its end)."""
    return io.StringIO(text, newline="\n").readlines()


def _file_documents(path: Path, name: str) -> list[Document]:
    return [Document(name, read_text(path))]


def _paragraph_documents(path: Path) -> list[Document]:
    """One document per paragraph of ``path`` (see `_read_texts`). A file with carriage returns
    and no line feed (old Mac line ends, which editors show as lines) is cut at carriage returns:
    cut at line feeds, it was one paragraph, and its run stopped at "the validation split is
    empty" with a fix (a blank line between paragraphs) that the file already followed."""
    text = read_text(path, or_else=None)  # the one file of --data: not "remove it"
    old_mac = "\r" in text and "\n" not in text
    lines = io.StringIO(text, newline="\r").readlines() if old_mac else split_lines(text)
    docs, block, start = [], [], 1
    for number, line in enumerate(lines, start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            docs.append(Document(f"{path.name}:{start}", "".join(block)))
            block = []
    if block:
        docs.append(Document(f"{path.name}:{start}", "".join(block)))
    return docs


def _jsonl_documents(
    path: Path, name: str, text_field: str, or_else: str | None = LEAVE_OUT
) -> list[Document]:
    """One document per record of a JSON Lines file (named by line number), or of a ``.json``
    file holding one JSON array of records (named by position: ``name:#3``). Records that cannot
    be read refuse the file after all of it is read, counted (`_Refusal`). ``or_else`` as
    `read_text`'s."""
    # a .json file may hold one JSON document (a glob's package.json): say how it was read
    as_read = " (a .json file is read as JSON Lines)" if path.suffix.lower() == ".json" else ""
    text = read_text(path, or_else=or_else)
    refusal = _Refusal()
    docs = []
    if as_read and text.lstrip().startswith("["):  # a JSON array (json.dump of a list of records)
        shape = "one JSON array of objects"
        for i, record in enumerate(_json_value(text, str(path), shape), start=1):
            try:
                found = _record_text(record, f"{path}: record {i}", text_field, shape)
            except UsageError as error:
                refusal.add(i, error)
                continue
            docs.append(Document(f"{name}:#{i}", found))
        refusal.check(len(docs), "records")
        return docs
    if as_read and text.lstrip().startswith("{"):
        _check_not_one_object(path, text, text_field)
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        # a byte-order mark opening a line is where `cat a.jsonl b.jsonl` joined two files that
        # a Windows editor saved: no part of the record, which json refused ("decode using
        # utf-8-sig", an advice no user of lowbit can take)
        line = line.removeprefix("\ufeff")
        try:
            record = _json_value(line, where, f"one JSON object per line{as_read}")
            found = _record_text(record, where, text_field, f"one object per line{as_read}")
        except UsageError as error:
            refusal.add(number, error)
            continue
        docs.append(Document(f"{name}:{number}", found))
    refusal.check(len(docs), "lines")
    return docs


class _Refusal:
    """The records of a file that cannot be read: refused in one line, the first one's error with
    the number and places (line or record numbers) of the others. Refused at the first, a corpus
    with a few hundred null texts took as many runs to learn what to fix."""

    SHOWN = 5  # places of other records named

    def __init__(self):
        self.first: UsageError | None = None
        self.places: list[int] = []
        self.count = 0

    def add(self, place: int, error: UsageError) -> None:
        if self.first is None:
            self.first = error
        elif len(self.places) < self.SHOWN:
            self.places.append(place)
        self.count += 1

    def check(self, good: int, unit: str) -> None:
        """Raise the refusal, if any record failed (``good`` records read; ``unit`` names the
        places: ``"lines"``)."""
        if self.first is None:
            return
        if self.count == 1:
            raise self.first
        problem, _, fix = str(self.first).partition("; fix: ")
        others = ", ".join(map(str, self.places))
        more = ", ..." if self.count - 1 > len(self.places) else ""
        raise UsageError(
            f"{problem} ({self.count - 1} more of its {self.count + good} {unit} fail too: "
            f"{others}{more}); fix: {fix}"
        )


def _check_not_one_object(path: Path, text: str, text_field: str) -> None:
    """Refuse a ``.json`` file that holds one JSON object (``{"data": [...records...]}``, as
    SQuAD and many exports are) rather than records, naming the array that holds them: read as
    JSON Lines it was "no field 'text' (found: data)", whose fix (``--text-field``) cannot work,
    or, printed over several lines, "invalid JSON" at its first."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # JSON Lines (or invalid: the reading names where)
        return
    if not isinstance(value, dict) or isinstance(value.get(text_field), str):
        return  # one record on one line: JSON Lines, read as such
    arrays = [
        key
        for key, item in value.items()
        if isinstance(item, list) and item and all(isinstance(r, dict) for r in item)
    ]
    if not arrays:  # no records in it: read as JSON Lines, its error names the field
        return
    key = arrays[0]
    select = f".{key}[]" if key.isidentifier() else f".[{json.dumps(key)}][]"
    raise UsageError(
        f"{path}: one JSON object holding its records in an array ({key!r}), not JSON Lines or "
        f"an array of records; fix: write them one per line (jq -c '{select}' "
        f"{shlex.quote(str(path))} > {shlex.quote(str(path.with_suffix('.jsonl')))}) and give "
        "that file"
    )


def _json_value(text: str, where: str, shape: str):
    """``json.loads(text)``, its errors as one line naming ``where`` and the expected ``shape``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{where}: invalid JSON ({error.msg}); fix: {shape}") from None
    except (ValueError, RecursionError) as error:  # Python's limits, not JSON's
        problem = (
            "nested too deeply"
            if isinstance(error, RecursionError)
            else "a number with more digits than Python reads"
        )
        raise UsageError(f"{where}: invalid JSON ({problem}); fix: {shape}") from None


_ABSENT = object()  # what `_field` finds where a record has no such field


def _field(record: dict, text_field: str):
    """``(value, names)``: ``record[text_field]``, or for a dotted name that is no key of the
    record a nested field (``meta.text``, as Hugging Face datasets' ``flatten`` names it), and the
    names of the fields of the object where the lookup ended (``meta.id, meta.title``), with
    `_ABSENT` as the value where it found none."""
    if text_field in record or "." not in text_field:
        return record.get(text_field, _ABSENT), list(record)
    value, prefix = record, ""
    for key in text_field.split("."):
        if not isinstance(value, dict) or key not in value:
            break
        value, prefix = value[key], f"{prefix}{key}."
    else:
        return value, list(record)
    names = [f"{prefix}{k}" for k in value] if isinstance(value, dict) else [prefix[:-1]]
    return _ABSENT, names


def _record_text(record, where: str, text_field: str, shape: str) -> str:
    """The string field ``text_field`` of a JSON record, or a one-line error naming ``where`` (and
    the expected ``shape`` of the file, for a record that is no object)."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: {JSON_TYPES[type(record)]}, not a JSON object; fix: {shape}")
    text, found = _field(record, text_field)
    if text is _ABSENT:
        raise UsageError(
            f"{where}: no field {text_field!r} (found: {', '.join(found) or 'none'}); "
            "fix: add it or name the field that holds the text with --text-field"
        )
    if not isinstance(text, str):
        inner = [k for k, v in text.items() if isinstance(v, str)] if isinstance(text, dict) else []
        name = f"--text-field {text_field}.{inner[0]}" if inner else ""
        raise UsageError(
            f"{where}: field {text_field!r} is {JSON_TYPES[type(text)]}, not a string; "
            "fix: make it the text, drop the record, or name the text field with "
            + (f"{name} (a field inside it)" if name else "--text-field")
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON may escape half of a surrogate pair
        raise UsageError(
            f"{where}: field {text_field!r} holds an unpaired surrogate "
            f"({text[error.start]!r} at character {error.start}), which is no Unicode text; "
            "fix: repair or drop the record"
        ) from None
    return text
