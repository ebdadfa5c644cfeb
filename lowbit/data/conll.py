"""CoNLL / IOB token-classification data and its metrics.

File format: one token per line, the token in the first column and its tag in the last (spaces or
tabs between columns: other Unicode whitespace, a no-break space say, is part of a token), a blank
line (or one of whitespace only) between sentences, ``-DOCSTART-`` lines between documents (they
hold no token; `read_conll_documents` keeps the sentences of each document together). Tags are ``O``
or ``B-TYPE`` / ``I-TYPE``. The file is UTF-8; a leading byte-order mark is dropped, not read as
part of the first token. A folder of such files holds its train, validation and test splits under
names `conll_split_of` reads (``train.txt``, ``dev.txt``, ``test.txt``; CoNLL-2003's ``eng.train``,
``eng.testa``, ``eng.testb``): `read_conll_folder`.

`entity_f1` scores entity spans with conlleval's chunk rules: a chunk starts at ``B-``, at an
``I-`` whose type differs from the previous tag's, or at an ``I-`` after ``O``; it ends where the
next tag does not continue it. A predicted entity counts only when type, start and end all match.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from lowbit.data.corpus import read_lines
from lowbit.errors import UsageError

COLUMN_SEPARATOR = re.compile(r"[ \t]+")


class Sentence(NamedTuple):
    """Tokens and their tags, one tag per token."""

    tokens: list[str]
    tags: list[str]


def is_valid_tag(tag: str) -> bool:
    """``O``, or ``B-`` / ``I-`` followed by a non-empty type."""
    return tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)


def read_conll(path) -> list[Sentence]:
    """The sentences of a CoNLL file; a malformed line or a file that is not UTF-8 raises
    `UsageError` naming the file and the line or byte."""
    return [sentence for document in read_conll_documents(path) for sentence in document]


def read_conll_documents(path) -> list[list[Sentence]]:
    """The sentences of a CoNLL file grouped by document: a ``-DOCSTART-`` line starts one (the
    sentences before the first make one too). Errors as `read_conll`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such CoNLL file; fix: check the path")
    documents: list[list[Sentence]] = [[]]
    tokens: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(read_lines(path), start=1):
        columns = COLUMN_SEPARATOR.split(line.strip(" \t\r\n")) if line.strip() else []
        if not columns or columns[0] == "-DOCSTART-":
            if tokens:
                documents[-1].append(Sentence(tokens, tags))
                tokens, tags = [], []
            if columns and documents[-1]:
                documents.append([])
            continue
        if len(columns) < 2:
            raise UsageError(
                f"{path}:{number}: one column {line.strip()!r}; fix: write 'TOKEN TAG' "
                "(token first, tag last, separated by spaces or a tab)"
            )
        if not is_valid_tag(columns[-1]):
            raise UsageError(
                f"{path}:{number}: invalid IOB tag {columns[-1]!r}; fix: use O, B-TYPE or I-TYPE"
            )
        tokens.append(columns[0])
        tags.append(columns[-1])
    if tokens:
        documents[-1].append(Sentence(tokens, tags))
    documents = [document for document in documents if document]
    if not documents:
        raise UsageError(f"{path}: no sentences; fix: one 'TOKEN TAG' per line, blank line between")
    return documents


# The files of a CoNLL folder, by split: a name's stem (what comes before its extension) is a split
# word, alone or followed by a digit, ``-``, ``_`` or ``.`` and more (``train.txt``, ``dev-2.iob``,
# ``train_en.conll``; BioNLP's ``devel.tsv``), and its extension one that data files have; or
# CoNLL-2003's own names (``eng.train``, ``eng.testa`` for development, ``eng.testb`` for test).
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
)
CONLL_2003_EXTENSIONS = {".train": "train", ".testa": "validation", ".testb": "test"}


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


def conll_folder_files(folder) -> dict[str, list[Path]]:
    """``{"train" | "validation" | "test": [files]}`` of a CoNLL folder, each split's files in
    name order (`conll_split_of` reads a name); a split without a file raises `UsageError`
    naming the files the folder holds and the names it takes."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    found: dict[str, list[Path]] = {split: [] for split in CONLL_SPLIT_WORDS}
    for path in files:
        split = conll_split_of(path.name)
        if split is not None:
            found[split].append(path)
    missing = [split for split, paths in found.items() if not paths]
    if missing:
        names = [p.name for p in files]
        held = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        words = ", ".join("|".join(words) for words in CONLL_SPLIT_WORDS.values())
        extensions = ", ".join(e or "none" for e in CONLL_DATA_EXTENSIONS)
        raise UsageError(
            f"{folder}: no {' or '.join(missing)} file among {held or 'no files'}; expected "
            f"names such as train.txt, dev.txt, test.txt (stem {words}, alone or followed by "
            f"-, _, . or a digit; extension {extensions}) or CoNLL-2003's *.train, *.testa, "
            "*.testb; fix: rename the split files"
        )
    return found


def read_conll_folder(folder) -> dict[str, list[Sentence]]:
    """The sentences of each split of a CoNLL folder (`conll_folder_files`), each split's files
    read in name order."""
    files = conll_folder_files(folder)
    return {
        split: [s for path in paths for s in read_conll(path)] for split, paths in files.items()
    }


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """The ``(type, start, end_exclusive)`` chunks of one tag sequence (conlleval rules)."""
    spans = set()
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, tag_kind = tag.partition("-")
        continues = prefix == "I" and tag_kind == kind
        if start is not None and not continues:
            spans.add((kind, start, i))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, tag_kind
    return spans


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


def token_report(true_tags: list[list[str]], pred_tags: list[list[str]]) -> tuple[str, dict]:
    """Per-tag token-level report from scikit-learn: ``(text, dict)`` of precision/recall/F1."""
    from sklearn.metrics import classification_report

    flat_true = [tag for sentence in true_tags for tag in sentence]
    flat_pred = [tag for sentence in pred_tags for tag in sentence]
    labels = sorted(set(flat_true) | set(flat_pred))
    kwargs = {"labels": labels, "zero_division": 0, "digits": 4}
    text = classification_report(flat_true, flat_pred, **kwargs)
    return text, classification_report(flat_true, flat_pred, output_dict=True, **kwargs)


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
