"""CoNLL / IOB token-classification data and its metrics.

File format: one token per line, the token in the first column and its tag in the last (spaces or
tabs between columns: other Unicode whitespace, a no-break space say, is part of a token; a word
line with more columns than most of the file's is warned of, as a token written with a space whose
other words are not read), a blank line (or one of whitespace only) between sentences,
``-DOCSTART-`` lines between documents (they hold no token; `read_conll_documents` keeps the
sentences of each document together). Tags are ``O`` or ``B-TYPE`` / ``I-TYPE``, and IOBES's
``E-TYPE`` / ``S-TYPE`` (BILOU's ``L-TYPE`` / ``U-TYPE``, spaCy's, are read as these: last and unit
are end and single). The file is UTF-8; a byte-order mark opening a line is dropped, not read as
part of its token (the file's first line, or where ``cat`` joined files that each begin with one).
A tag holds no whitespace nor invisible character: a no-break space left after one is refused, not
read as a tag of its own. JSON (a ``.jsonl`` / ``.json`` file, or one whose first line is a JSON
record: Hugging Face datasets' ``to_json``) is refused as such.

A treebank file (``.conllu``, Universal Dependencies' CoNLL-U, and its predecessor ``.conllx``)
is read otherwise: 10 tab-separated columns, its words tagged with their part of speech, column 4
(UPOS in CoNLL-U, CPOSTAG in CoNLL-X); the last column, the one a CoNLL file's tag is in, holds
CoNLL-U's MISC notes. ``#`` lines are comments (``# newdoc`` starts a document), and the
lines of a multiword token's range (``1-2``) and of an empty node (``1.1``) hold no word of their
own, so they are skipped.

A folder of such files holds its train, validation and test splits under names `conll_split_of`
reads (``train.txt``, ``dev.txt``, ``test.txt``; CoNLL-2003's ``eng.train``, ``eng.testa``,
``eng.testb``): `read_conll_folder`.

`entity_f1` scores entity spans with conlleval's chunk rules: a chunk starts at ``B-`` or ``S-``,
or at an ``I-`` / ``E-`` that does not continue the chunk before (after ``O``, after another type,
after a chunk's ``E-`` / ``S-`` end); it ends at ``E-`` / ``S-`` or where the next tag does not
continue it. A tag with none of these prefixes (a part of speech) is a chunk of one token, so on a
treebank entity F1 is the tokens' micro F1. A predicted entity counts only when type, start and
end all match.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import unicodedata
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from lowbit.data.corpus import (
    JSONL_SUFFIXES,
    LEAVE_OUT,
    read_lines,
    unpack_fix,
    unpacked_path,
)
from lowbit.errors import UsageError, warn_once

COLUMN_SEPARATOR = re.compile(r"[ \t]+")


class Sentence(NamedTuple):
    """Tokens and their tags, one tag per token."""

    tokens: list[str]
    tags: list[str]


CHUNK_PREFIXES = ("B", "I", "E", "S", "L", "U")  # IOB2 / IOB1: B, I; IOBES adds E (end), S (single)
BILOU_AS_IOBES = {"L": "E", "U": "S"}  # BILOU's last and unit: IOBES's end and single
TREEBANK_EXTENSIONS = (".conllu", ".conllx")
TREEBANK_COLUMNS = 10  # ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC (CoNLL-U)
TREEBANK_TAG_COLUMN = 3  # UPOS (CoNLL-X: CPOSTAG), 0-based


def is_valid_tag(tag: str) -> bool:
    """``O``, or ``B-`` / ``I-`` / ``E-`` / ``S-`` (``L-`` / ``U-``) followed by a non-empty type."""
    return tag == "O" or (tag[:1] in CHUNK_PREFIXES and tag[1:2] == "-" and len(tag) > 2)


def read_conll(path, or_else: str | None = None) -> list[Sentence]:
    """The sentences of a CoNLL file; a malformed line or a file that is not UTF-8 raises
    `UsageError` naming the file and the line or byte. ``or_else``: the fix besides converting
    such a file (`read_text`'s): none for the one file of --data, "remove it" for one of several
    files of a folder's split."""
    return [s for document in read_conll_documents(path, or_else) for s in document]


def read_conll_documents(path, or_else: str | None = None) -> list[list[Sentence]]:
    """The sentences of a CoNLL file grouped by document: a ``-DOCSTART-`` line (a treebank's
    ``# newdoc`` comment) starts one (the sentences before the first make one too). Errors and
    ``or_else`` as `read_conll`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such CoNLL file; fix: check the path")
    read_word = _treebank_word if path.suffix.lower() in TREEBANK_EXTENSIONS else _conll_word
    documents: list[list[Sentence]] = [[]]
    tokens: list[str] = []
    tags: list[str] = []
    widths: dict[int, list] = {}  # columns of a word's line: [lines, first line number, text]
    lines = read_lines(path, or_else=or_else)
    if _is_json(path, next((line for line in lines if line.strip()), "")):
        raise _json_refusal(path)
    for number, line in enumerate(lines, start=1):
        # a mark opening a line after the first is where `cat a.txt b.txt` joined files that a
        # Windows editor saved: read as part of the token, b's "-DOCSTART-" line was a word
        line = line.removeprefix("\ufeff")
        if "\r" in line.rstrip("\r\n"):  # lines end at a line feed only: a lone CR is no end
            raise UsageError(
                f"{path}:{number}: a carriage return inside a line (old Mac line ends?), which "
                "would join the lines it ends into one token and tag; fix: save the file with "
                "LF (or CRLF) line ends"
            )
        word = read_word(f"{path}:{number}", line)
        if word is None:
            continue
        if word in (SENTENCE_END, DOCUMENT_START):
            if tokens:
                documents[-1].append(Sentence(tokens, tags))
                tokens, tags = [], []
            if word == DOCUMENT_START and documents[-1]:
                documents.append([])
            continue
        tokens.append(word[0])
        tags.append(word[1])
        if read_word is _conll_word:
            width = len(COLUMN_SEPARATOR.split(line.strip(" \t\r\n")))
            widths.setdefault(width, [0, number, line.strip()])[0] += 1
    if tokens:
        documents[-1].append(Sentence(tokens, tags))
    _warn_wide_lines(path, widths)
    documents = [document for document in documents if document]
    if not documents:
        raise UsageError(f"{path}: no sentences; fix: one 'TOKEN TAG' per line, blank line between")
    return documents


def _is_json(path: Path, first: str) -> bool:
    """Whether the file at ``path``, whose first line of text is ``first``, holds JSON: by its
    name (``.jsonl``, ``.json``), or a first line that is a JSON object or array."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    text = first.strip().removeprefix("\ufeff")
    if not text.startswith(("{", "[")):
        return False
    try:
        return isinstance(json.loads(text), dict | list)
    except ValueError:  # a CoNLL line that opens with a bracket ("[ O")
        return False


def _json_refusal(path) -> UsageError:
    """The refusal of JSON data given as a tagger's CoNLL file (Hugging Face datasets'
    ``to_json``: a record of ``tokens`` and ``ner_tags`` per line). Read as 'TOKEN TAG' lines,
    it was refused as holding the tag ``"O"]}`` with a fix that listed the valid tags."""
    return UsageError(
        f"{path}: JSON, not the CoNLL text that token classification reads; fix: write each word "
        "and its tag on a line of their own ('Ann B-PER'), a blank line between sentences, into "
        "a .txt file"
    )


def _warn_wide_lines(path: Path, widths: dict[int, list]) -> None:
    """Warn of the word lines with more columns than most of the file's: a token written with a
    space (``New York B-LOC`` among ``TOKEN TAG`` lines) was read as ``New`` tagged ``B-LOC``,
    its other words dropped without a word. A line with fewer columns loses nothing."""
    usual = max(widths, key=lambda width: widths[width][0], default=0)
    wide = sorted(
        (number, width, text) for width, (_, number, text) in widths.items() if width > usual
    )
    if not wide:
        return
    count = sum(widths[width][0] for _, width, _ in wide)
    number, width, text = wide[0]
    line = (
        f"{path}:{number}: {count} word line{'s' if count > 1 else ''} of more columns than the "
        f"file's {usual} ({text!r}: {width}); the token is the first column and the tag the "
        "last, so the columns between are not read; fix: write each token without spaces "
        f"(one word per line), in the file's {usual} columns"
    )
    warn_once(line)  # a file is read more than once per run (its fingerprint, its task)


COMMENT_FIX = (
    "remove the comment lines (those opening with #): 'TOKEN TAG' files hold none (a "
    "treebank's .conllu file does)"
)
# The label of the word pieces after a word's first in a tokenized token-classification set
# (PyTorch's cross-entropy ignore_index), written out as a tag
IGNORE_INDEX = "-100"
SENTENCE_END = ("", "")  # what a line reads as, beside a (token, tag) pair or None (no word)
DOCUMENT_START = ("-DOCSTART-", "")


def _conll_word(where: str, line: str) -> tuple[str, str]:
    """The (token, tag) of a CoNLL line: first column and last."""
    columns = COLUMN_SEPARATOR.split(line.strip(" \t\r\n")) if line.strip() else []
    if not columns:
        return SENTENCE_END
    if columns[0] == "-DOCSTART-":
        return DOCUMENT_START
    if len(columns) < 2:
        fix = "write 'TOKEN TAG' (token first, tag last, separated by spaces or a tab)"
        raise UsageError(
            f"{where}: one column {line.strip()!r}; fix: "
            + (COMMENT_FIX if _comment(columns[0]) else fix)  # '#newdoc'
        )
    _check_tag_characters(where, columns[-1])
    if not is_valid_tag(columns[-1]):
        fix = "use O, B-TYPE, I-TYPE (or IOBES's E-TYPE, S-TYPE; BILOU's L-TYPE, U-TYPE)"
        if len(line.rstrip("\r\n").split("\t")) == TREEBANK_COLUMNS:  # a treebank's line
            fix = "name the file .conllu to read it as CoNLL-U (words tagged with their UPOS)"
        elif columns[-1] == IGNORE_INDEX:  # a tokenized label set's word pieces ('##e -100')
            fix = (
                f"write each word's tag name: {IGNORE_INDEX} is the label that tokenized data "
                "gives the word pieces after a word's first, which no loss counts, not a tag "
                "(write out the words and ner_tags from before tokenizing)"
            )
        elif _comment(columns[0]):  # '# sent_id = 3': "tag '3'"; '# newdoc'
            fix = COMMENT_FIX
        elif columns[-1].isdigit():  # a Hugging Face dataset's ner_tags written out as ids
            fix = (
                "write each tag's name, not its number (a Hugging Face dataset's ner_tags ids "
                "name the tags of features['ner_tags'].feature.names)"
            )
        elif is_valid_tag(capital := columns[-1][:1].upper() + columns[-1][1:]):  # 'b-per'
            fix = f"write the tag's prefix in capitals ({capital})"
        elif is_valid_tag(columns[0]):  # 'B-PER Ann': the listed tags were no help there
            fix = f"write the token first and its tag last ({columns[-1]} {columns[0]})"
        elif "-" not in columns[-1]:  # 'dog NN': a part of speech, which no B-/I- fits
            fix = f"prefix entity tags with B-/I-, or for parts of speech {_as_treebank(where)}"
        raise UsageError(f"{where}: invalid IOB tag {columns[-1]!r}; fix: {fix}")
    return columns[0], columns[-1]


# The awk program of `_as_treebank`: a 'TOKEN TAG' line as a CoNLL-U word (ID FORM _ UPOS and six
# _), its CR dropped first (a CRLF file's tags were 'NN\r', its blank lines words), a -DOCSTART-
# line as the ``# newdoc`` comment that starts a treebank's document.
TREEBANK_AWK = (
    r'{sub(/\r$/,"")} $1=="-DOCSTART-"{print "# newdoc";i=0;next} '
    r'NF{print ++i,$1,"_",$NF,"_","_","_","_","_","_";next} {i=0;print ""}'
)


def _as_treebank(where: str) -> str:
    """The fix of a 'TOKEN TAG' file of tags without B-/I- prefixes (``where``: its
    ``path:line``): the awk commands that write it as CoNLL-U, whose words are tagged with their
    part of speech (column 4), each scored as a one-token chunk, and the --data to train on then.
    Into a new file (``train.2.conllu`` where ``train.conllu`` is there); for a split file of a
    CoNLL folder, each split's file into a new folder (a .conllu file beside the .txt was a second
    file of its split, the .txt still refused)."""
    path = Path(where.rsplit(":", 1)[0])
    folder = _split_folder(path)
    if folder is None:
        out = _unused(path.with_suffix(".conllu"), lambda n: f"{path.stem}.{n}.conllu")
        pairs, make = [(path, out)], ""
    else:
        named = folder if folder.name not in ("", "..") else Path(os.path.abspath(folder))
        out = _unused(named.with_name(f"{named.name}-conllu"), lambda n: f"{named.name}-conllu{n}")
        files = conll_folder_files(folder)
        pairs, names = [], set()
        for split, paths in files.items():
            for file in paths:
                if file.suffix.lower() not in TREEBANK_EXTENSIONS:
                    pairs.append((file, out / _treebank_name(file.name, split, names)))
        make = f"mkdir {shlex.quote(str(out))} && "
    awk = " && ".join(
        f"awk -v OFS='\\t' \"$p\" {shlex.quote(str(f))} > {shlex.quote(str(o))}" for f, o in pairs
    )
    return (
        f"write the {'file' if folder is None else 'folder'} as CoNLL-U and train on it, --data "
        f"{shlex.quote(str(out))}: p={shlex.quote(TREEBANK_AWK)}; {make}{awk}"
    )


def _split_folder(path: Path) -> Path | None:
    """The CoNLL folder that ``path`` is a split file of (`conll_folder_files`), or None."""
    if not conll_split_of(path.name):
        return None
    try:
        files = conll_folder_files(path.parent)
    except (UsageError, OSError):
        return None
    return path.parent if any(path in paths for paths in files.values()) else None


def _unused(path: Path, numbered) -> Path:
    """``path``, or beside it the first ``numbered(n)`` name (n = 2, 3...) that is not taken."""
    number = 2
    while path.exists():
        path, number = path.with_name(numbered(number)), number + 1
    return path


def _treebank_name(name: str, split: str, taken: set[str]) -> str:
    """The CoNLL-U file name of the split file ``name`` in a new folder: ``train.conllu`` for
    ``train.txt``, ``train-eng.train.conllu`` for CoNLL-2003's ``eng.train`` (``eng.conllu``
    names no split); not one of ``taken``, to which it is added."""
    word = SPLIT_FILE_WORDS[split]
    out = f"{Path(name).stem}.conllu"
    if conll_split_of(out) != split or out in taken:
        out = f"{word}-{name}.conllu"
    taken.add(out)
    return out


def _comment(token: str) -> bool:
    """Whether a line whose first column is ``token`` is a comment (``# newdoc``), not a word:
    a WordPiece tokenizer's pieces open with ``##``."""
    return token.startswith("#") and not token.startswith("##")


def _check_tag_characters(where: str, tag: str) -> None:
    """A `UsageError` for a tag holding whitespace that the columns were not split at, or an
    invisible character (a no-break or zero-width space pasted after ``B-ORG``, a space typed
    after a treebank's ``NOUN``): read as it is, the tag was a label of its own beside ``B-ORG``,
    printed alike in the per-label report, and the words it tags were counted apart from their
    entity type's."""
    unseen = (c for c in tag if c.isspace() or unicodedata.category(c) in ("Cc", "Cf"))
    char = next(unseen, None)
    if char is not None:
        name = unicodedata.name(char, "control character").lower()
        raise UsageError(
            f"{where}: the tag {tag!r} holds a {name} (U+{ord(char):04X}), which no tag has; "
            "fix: remove it from the tag"
        )


def _treebank_word(where: str, line: str) -> tuple[str, str] | None:
    """The (FORM, UPOS) of a CoNLL-U / CoNLL-X line; None for a comment, a multiword token's
    range or an empty node. Columns are split at tabs only: a FORM may hold a space."""
    if not line.strip():
        return SENTENCE_END
    if line.startswith("#"):
        return DOCUMENT_START if line[1:].strip().startswith("newdoc") else None
    columns = line.rstrip("\r\n").split("\t")
    if len(columns) != TREEBANK_COLUMNS:
        raise UsageError(
            f"{where}: {len(columns)} tab-separated columns; fix: write the {TREEBANK_COLUMNS} "
            "columns of CoNLL-U (ID FORM LEMMA UPOS ...) separated by tabs, or name the file "
            ".txt to read it as 'TOKEN TAG' lines"
        )
    if "-" in columns[0] or "." in columns[0]:
        return None
    form, tag = columns[1], columns[TREEBANK_TAG_COLUMN]
    _check_tag_characters(where, tag)
    if not form or tag in ("", "_"):
        raise UsageError(
            f"{where}: word {form!r} has no part-of-speech tag in column 4 (UPOS), the column "
            "lowbit reads from a treebank file; fix: tag every word there"
        )
    return form, tag


# The files of a CoNLL folder, by split: a name's stem (what comes before its extension) is a split
# word, alone or followed by a digit, ``-``, ``_`` or ``.`` and more (``train.txt``, ``dev-2.iob``,
# ``train_en.conll``; BioNLP's ``devel.tsv``), and its extension one that data files have; or
# CoNLL-2003's own names (``eng.train``, ``eng.testa`` for development, ``eng.testb`` for test),
# or Universal Dependencies' (``en_ewt-ud-train.conllu``, a large treebank's parts
# ``cs_pdt-ud-train-ca.conllu``; only the .conllu files: a treebank's folder also holds its raw
# text, ``en_ewt-ud-train.txt``, which is no tagged data).
# A name with a second split's word after its first (BioBERT's ``train_dev.tsv``: the train and
# devel sentences together) holds no one split and is left out.
CONLL_SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("dev", "devel", "development", "valid", "validation", "val"),
    "test": ("test", "testing"),
}
CONLL_DATA_EXTENSIONS = (
    *("", ".txt", ".tsv", ".tab", ".data", ".dat", ".ner"),
    *(".conll", ".conllu", ".conllx", ".conll03", ".iob", ".iob1", ".iob2", ".bio", ".bioes"),
    *(".iobes", ".bilou", ".biluo"),
)
CONLL_2003_EXTENSIONS = {".train": "train", ".testa": "validation", ".testb": "test"}
# the word a new split file's name takes for each split (`_split_file_name`, `_treebank_name`)
SPLIT_FILE_WORDS = {"train": "train", "validation": "dev", "test": "test"}
UD_NAME = re.compile(r"[^.]+-ud-(train|dev|test)(-[a-z0-9]+)?\.conllu")  # cs_pdt-ud-train-c


def conll_split_of(name: str) -> str | None:
    """The split a CoNLL folder's file called ``name`` holds (see `CONLL_SPLIT_WORDS`), or None.

    The stem must be a split word, not merely start with one, and the extension must be a data
    file's: a prefix rule took ``values.txt`` as validation data, ``trainer.py`` as training data,
    and editors' backups (``train.txt~``, ``train.txt.bak``, ``train.txt.orig``) as a second copy
    of the sentences; hidden files (``.train.txt.swp``) are never data. Nor is a name that
    names a second split (``train_dev.tsv``, ``dev-test.txt``): read as its first split's data,
    BioBERT's ``train_dev.tsv`` put the validation sentences into training."""
    if name.startswith("."):
        return None
    lowered = Path(name.lower())
    if lowered.suffix in CONLL_2003_EXTENSIONS:
        return CONLL_2003_EXTENSIONS[lowered.suffix]
    if ud := UD_NAME.fullmatch(lowered.name):
        return {"train": "train", "dev": "validation", "test": "test"}[ud.group(1)]
    if lowered.suffix not in CONLL_DATA_EXTENSIONS:
        return None
    word = re.match(r"[a-z]+", lowered.stem)
    rest = lowered.stem[word.end() :] if word else ""
    if word is None or (rest and rest[0] not in "-_.0123456789"):
        return None
    split = next((s for s, words in CONLL_SPLIT_WORDS.items() if word.group() in words), None)
    other_words = {w for s, words in CONLL_SPLIT_WORDS.items() if s != split for w in words}
    if other_words.intersection(re.findall(r"[a-z]+", rest)):
        return None
    return split


def _split_file_name(name: str, split: str) -> str:
    """The name of ``split``'s file beside the split file called ``name``, in its pattern:
    ``eng.testb`` beside CoNLL-2003's ``eng.train``, ``en_ewt-ud-test.conllu`` beside
    ``en_ewt-ud-train.conllu``, ``test.conllu`` beside ``train.conllu`` (its extension: a
    ``test.txt`` beside treebank files is read as IOB text, not CoNLL-U)."""
    word = SPLIT_FILE_WORDS[split]
    path = Path(name)
    if path.suffix.lower() in CONLL_2003_EXTENSIONS:
        ending = {v: k for k, v in CONLL_2003_EXTENSIONS.items()}[split]
        return path.stem + ending
    if ud := UD_NAME.fullmatch(name.lower()):  # a treebank part's -c, -l suffix is dropped
        return f"{name[: ud.start(1)]}{word}{path.suffix}"
    stem = re.match(r"[a-z]+", path.stem.lower())
    return f"{word}{path.stem[stem.end() :]}{path.suffix}"


def conll_folder_files(folder, splits=CONLL_SPLIT_WORDS) -> dict[str, list[Path]]:
    """``{"train" | "validation" | "test": [files]}`` of a CoNLL folder (of ``splits`` alone
    where given), each split's files in name order (`conll_split_of` reads a name); a split
    without a file raises `UsageError` naming the files the folder holds and the names it takes."""
    folder = Path(folder)
    entries = sorted(folder.iterdir())
    # a split file's link to nothing (a disk not mounted) was left out: "no test file among
    # dev.txt, train.txt; fix: rename the split files", or, beside another file of its split,
    # its sentences missed without a word
    dead = [p for p in entries if conll_split_of(p.name) and p.is_symlink() and not p.exists()]
    if dead:
        others = f" (and {len(dead) - 1} more such)" if len(dead) > 1 else ""
        raise UsageError(
            f"{dead[0]}: a link to {os.readlink(dead[0])}, which does not exist{others}; fix: "
            "restore its target (mount the disk) or remove the link"
        )
    files = [p for p in entries if p.is_file()]
    found: dict[str, list[Path]] = {split: [] for split in splits}
    for path in files:
        split = conll_split_of(path.name)
        if split in found:
            found[split].append(path)
    missing = [split for split, paths in found.items() if not paths]
    if missing:
        # split files of JSON: renamed as the error below says, each was refused as JSON next
        json_files = [
            p
            for p in files
            if p.suffix.lower() in JSONL_SUFFIXES and conll_split_of(p.with_suffix(".txt").name)
        ]
        if json_files:
            raise _json_refusal(json_files[0])
        # compressed split files (train.txt.gz): "rename the split files" was the fix
        packed = [p.name for p in files if (u := unpacked_path(p)) and conll_split_of(u.name)]
        if packed:
            raise UsageError(
                f"{folder}: its split files are compressed ({', '.join(packed[:3])}), and lowbit "
                f"reads plain UTF-8 files; fix: {unpack_fix(folder, packed)}"
            )
        names = [p.name for p in files]
        held = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        words = ", ".join("|".join(words) for words in CONLL_SPLIT_WORDS.values())
        extensions = ", ".join(e or "none" for e in CONLL_DATA_EXTENSIONS)
        fix = "rename the split files"
        if files and all(conll_split_of(p.name) for p in files):  # train.txt, dev.txt: no test
            named = " and ".join(_split_file_name(files[0].name, split) for split in missing)
            fix = f"add {named}: sentences held out of the others"
        raise UsageError(
            f"{folder}: no {' or '.join(missing)} file among {held or 'no files'}; expected "
            f"names such as train.txt, dev.txt, test.txt (stem {words}, alone or followed by "
            f"-, _, . or a digit; extension {extensions}), CoNLL-2003's *.train, *.testa, "
            f"*.testb or Universal Dependencies' *-ud-train.conllu, *-ud-dev.conllu, "
            f"*-ud-test.conllu; fix: {fix}"
        )
    return found


def read_conll_folder(folder, splits=CONLL_SPLIT_WORDS) -> dict[str, list[Sentence]]:
    """The sentences of each split of a CoNLL folder (of ``splits`` alone where given:
    `conll_folder_files`), each split's files read in name order."""
    files = conll_folder_files(folder, splits)
    return {  # a split's only file cannot be left out
        split: [s for p in paths for s in read_conll(p, LEAVE_OUT if len(paths) > 1 else None)]
        for split, paths in files.items()
    }


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """The ``(type, start, end_exclusive)`` chunks of one tag sequence (conlleval rules, IOB and
    IOBES, BILOU; a tag without a chunk prefix is a one-token chunk: see the module doc)."""
    spans = set()
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, dash, tag_kind = tag.partition("-")
        prefix = BILOU_AS_IOBES.get(prefix, prefix)
        if tag != "O" and not (dash and prefix in CHUNK_PREFIXES):
            prefix, tag_kind = "S", tag
        continues = start is not None and prefix in ("I", "E") and tag_kind == kind
        if start is not None and not continues:
            spans.add((kind, start, i))
            start = None
        if prefix in CHUNK_PREFIXES and not continues:
            start, kind = i, tag_kind
        if start is not None and prefix in ("E", "S"):  # the chunk ends with this token
            spans.add((kind, start, i + 1))
            start = None
    return spans


def iob_scheme(sentences: list[Sentence]) -> str | None:
    """How most of the sentences' entities that do not follow one of their type open: ``"IOB1"``
    with ``I-`` (CoNLL-2003's own files: ``B-`` only between two entities of one type),
    ``"IOB2"`` with ``B-``. Most, not all: a file of one scheme with a slip (or a sentence
    pasted from another file) is still of that scheme. None for as many of each, or none (IOBES's
    ``S-`` alone, tags without a chunk prefix)."""
    openings = Counter()
    for sentence in sentences:
        before = None  # the entity type of the tag before, None after "O" or a sentence's start
        for tag in sentence.tags:
            prefix, dash, kind = tag.partition("-")
            kind = kind if dash and prefix in CHUNK_PREFIXES else None
            if kind is not None and kind != before and prefix in ("B", "I"):
                openings["IOB2" if prefix == "B" else "IOB1"] += 1
            before = kind
    if openings["IOB1"] == openings["IOB2"]:
        return None
    return "IOB1" if openings["IOB1"] > openings["IOB2"] else "IOB2"


def entity_f1(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """Entity-level precision, recall and F1 over sentences of tags, overall and per type.

    Returns ``{"precision", "recall", "f1", "true", "pred", "correct", "per_type": {type: {...}}}``
    where ``true``/``pred``/``correct`` count entities. Scores with no entities to divide by are 0.
    """
    if len(true_tags) != len(pred_tags):
        raise ValueError("true and predicted tags need the same number of sentences")
    true, pred = set(), set()
    for n, (t, p) in enumerate(zip(true_tags, pred_tags)):
        if len(t) != len(p):
            raise ValueError(f"sentence {n}: {len(t)} true tags but {len(p)} predicted")
        true |= {(n, *span) for span in entity_spans(t)}
        pred |= {(n, *span) for span in entity_spans(p)}
    kinds = sorted({span[1] for span in true | pred})
    per_type = {
        k: _scores({s for s in true if s[1] == k}, {s for s in pred if s[1] == k}) for k in kinds
    }
    return {**_scores(true, pred), "per_type": per_type}


def _scores(true: set, pred: set) -> dict:
    correct = len(true & pred)
    precision = correct / len(pred) if pred else 0.0
    recall = correct / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if correct else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true": len(true),
        "pred": len(pred),
        "correct": correct,
    }


def token_report(
    true_tags: list[list[str]], pred_tags: list[list[str]], labels: list[str] | None = None
) -> tuple[str, dict]:
    """Per-tag token-level report (`lowbit.data.label_report`): ``(text, dict)`` of precision,
    recall, F1 and integer support, a row for each tag in ``labels`` (every tag of the task: one
    the sentences evaluated lack still has its row) and for any other tag found, in name order."""
    from lowbit.data.label_report import label_report

    flat_true = [tag for sentence in true_tags for tag in sentence]
    flat_pred = [tag for sentence in pred_tags for tag in sentence]
    return label_report(flat_true, flat_pred, sorted({*(labels or ()), *flat_true, *flat_pred}))


def aligned_tags(labels, predictions, id2label: dict[int, str]):
    """Word-level ``(true_tags, pred_tags)`` from (batch, seq) label and predicted-id tensors.

    Positions whose label is -100 (padding, special tokens, later word pieces) are dropped, so
    each sentence keeps one tag per word, ready for `entity_f1` and `token_report`.
    """
    true_tags, pred_tags = [], []
    for label_row, pred_row in zip(labels.tolist(), predictions.tolist()):
        keep = [(lab, pred) for lab, pred in zip(label_row, pred_row) if lab != -100]
        true_tags.append([id2label[lab] for lab, _ in keep])
        pred_tags.append([id2label[pred] for _, pred in keep])
    return true_tags, pred_tags
