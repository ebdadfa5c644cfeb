"""The built-in token-classification task: the syntactic role of each token of Python source.

Tokens come from `tokenize` (comments, newlines and indentation tokens dropped); labels come from
`ast`, matched to tokens by position (ast columns are UTF-8 byte offsets, converted to characters):

========  =================================================================
DEF       the name in a ``def`` / ``class`` statement
CALL      the name that is called: ``f`` in ``f()``, ``x`` in ``a.x()``
ATTR      an attribute name that is not called: ``x`` in ``a.x``
PARAM     a parameter (``def f(a)``, ``lambda a:``) or keyword argument (``f(a=1)``)
STORE     a name bound or deleted: assignment targets, ``for`` / ``with`` / ``except ... as``
          names, imported names, ``match`` captures
LOAD      a name read
KEYWORD   a keyword, or a soft keyword (``match``, ``case``, ``_``) with no other role
STRING    a string literal; adjacent literals (implicit concatenation) are one entity
NUMBER    a number literal
O         operators, punctuation, and names with none of the roles above
========  =================================================================

Every entity is one token (``B-``) except concatenated strings (``B-STRING I-STRING ...``), so
`lowbit.data.conll.entity_f1` applies. The roles need context: the same name is DEF, CALL, STORE or
LOAD depending on its neighbours. An example ("sentence") is a run of whole logical lines packed
into at most ``window`` tokens; a longer logical line is cut into windows of ``window`` tokens.
For a pretrained encoder the window counts the word pieces of its tokenizer instead.

Files come from the stdlib corpus (`lowbit.data.corpus`) with its by-file split; files that do
not parse are skipped. Input ids for a BERT-style model come from `WordVocab` (word-level, built on
the train split) or from a pretrained model's own tokenizer (`encode_with_tokenizer`).

Each file's tags are cached on disk (`lowbit.data.cache`, ``syntax-tags``): tagging the ~90 files
took every process that built the task seconds. An entry is keyed by the file's text, and its
generation by this module's source and Python's version (`tokenize` and `ast` change between
versions), so a changed file, tagger or interpreter never reads a stale entry. What a pretrained
tokenizer makes of the words (their pieces, each split's encoding) is cached as well
(``word-pieces``, `_through_cache`), keyed by the tokenizer's state, not its files; its
`PIECES_KEPT` most recently used entries are kept.
"""

from __future__ import annotations

import ast
import base64
import bisect
import functools
import hashlib
import io
import json
import keyword
import sys
import tokenize
import weakref
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lowbit.data.cache import JsonCache, cache_root, digest
from lowbit.data.conll import Sentence
from lowbit.data.corpus import split_documents, stdlib_documents
from lowbit.errors import UsageError

ENTITY_TYPES = ("DEF", "CALL", "ATTR", "PARAM", "STORE", "LOAD", "KEYWORD", "STRING", "NUMBER")
LABELS = ("O", *(f"B-{t}" for t in ENTITY_TYPES), "I-STRING")
IGNORE_INDEX = -100  # the label of positions the loss and metrics skip (torch's default)

_SKIPPED = {tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.COMMENT}
_STRING_TYPES = {
    getattr(tokenize, name)
    for name in ("STRING", "FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
    if hasattr(tokenize, name)
}


def tag_source(source: str) -> list[Sentence]:
    """The logical lines of ``source`` as tagged sentences (raises SyntaxError if it doesn't parse)."""
    lines_text = io.StringIO(source).readlines()
    tokens = [
        t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in _SKIPPED
    ]
    roles = _name_roles(ast.parse(source), tokens, lines_text)
    sentences, words, tags = [], [], []
    for tok in tokens:
        if tok.type == tokenize.NEWLINE:
            if words:
                sentences.append(Sentence(words, tags))
            words, tags = [], []
            continue
        if tok.type in _STRING_TYPES:
            tag = "I-STRING" if tags and tags[-1].endswith("-STRING") else "B-STRING"
        elif tok.type == tokenize.NUMBER:
            tag = "B-NUMBER"
        elif tok.type == tokenize.NAME:
            tag = _name_tag(tok, roles)
        else:
            tag = "O"
        words.append(tok.string)
        tags.append(tag)
    if words:
        sentences.append(Sentence(words, tags))
    return sentences


def _name_tag(tok, roles: dict) -> str:
    if keyword.iskeyword(tok.string):
        return "B-KEYWORD"
    role = roles.get(tok.start)
    if role:
        return f"B-{role}"
    return "B-KEYWORD" if keyword.issoftkeyword(tok.string) else "O"


def _name_roles(tree: ast.AST, tokens: list, lines: list[str]) -> dict:
    """Role of each NAME token, keyed by its (row, col) start in characters."""
    starts = [t.start for t in tokens]
    by_end = {t.end: t.start for t in tokens if t.type == tokenize.NAME}

    def pos(lineno: int, byte_col: int) -> tuple[int, int]:
        line = lines[lineno - 1] if lineno <= len(lines) else ""
        if line.isascii():
            return lineno, byte_col
        return lineno, len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))

    def find(name: str, first: tuple, last: tuple, from_end: bool = False):
        """Start of the first (or last) NAME token equal to ``name`` in [first, last)."""
        lo, hi = bisect.bisect_left(starts, first), bisect.bisect_left(starts, last)
        span = range(hi - 1, lo - 1, -1) if from_end else range(lo, hi)
        return next((starts[i] for i in span if tokens[i].string == name), None)

    def start(node):
        return pos(node.lineno, node.col_offset)

    def end(node):
        return pos(node.end_lineno, node.end_col_offset)

    roles: dict = {}
    calls: list = []
    for node in ast.walk(tree):
        found = []
        if isinstance(node, ast.Name):
            role = "LOAD" if isinstance(node.ctx, ast.Load) else "STORE"
            found = [(start(node), role)]
        elif isinstance(node, ast.arg) or (isinstance(node, ast.keyword) and node.arg):
            found = [(start(node), "PARAM")]
        elif isinstance(node, ast.Attribute):
            found = [(by_end.get(end(node)), "ATTR")]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found = [(find(node.name, start(node), end(node)), "DEF")]
        elif isinstance(node, ast.alias) and node.name != "*":
            if node.asname:
                found = [(find(node.asname, start(node), end(node), from_end=True), "STORE")]
            else:
                found = [(find(node.name.split(".")[0], start(node), end(node)), "STORE")]
        elif isinstance(node, ast.ExceptHandler) and node.name:
            after = end(node.type) if node.type else start(node)
            found = [(find(node.name, after, end(node)), "STORE")]
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            after = end(node.pattern) if getattr(node, "pattern", None) else start(node)
            found = [(find(node.name, after, end(node)), "STORE")]
        elif isinstance(node, ast.MatchMapping) and node.rest:
            found = [(find(node.rest, start(node), end(node), from_end=True), "STORE")]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                calls.append(start(func))
            elif isinstance(func, ast.Attribute):
                calls.append(by_end.get(end(func)))
        roles.update((key, role) for key, role in found if key is not None)
    roles.update((key, "CALL") for key in calls if key is not None)
    return roles


def pack_sentences(
    lines: list[Sentence], window: int, pieces: dict[str, int] | None = None
) -> list[Sentence]:
    """Pack whole logical lines into sentences of at most ``window`` tokens (see module doc).

    ``pieces`` measures the window in a pretrained tokenizer's word pieces instead (a word's
    count, `piece_counts`): a window of ``--seq-len`` words is several times as many pieces of
    Python, so most of each sentence was cut off by the encoder's length, whatever the length."""

    def size(words: list[str]) -> int:
        return sum(pieces[w] for w in words) if pieces is not None else len(words)

    packed: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    used = 0  # size(words), kept as it grows: summing the whole sentence per chunk was quadratic
    for line in lines:
        for chunk_words, chunk_tags in _cut(line, window, pieces):
            cost = size(chunk_words)
            if words and used + cost > window:
                packed.append(_sentence(words, tags))
                words, tags, used = [], [], 0
            words, tags, used = words + chunk_words, tags + chunk_tags, used + cost
    if words:
        packed.append(_sentence(words, tags))
    return packed


def _cut(line: Sentence, window: int, pieces: dict[str, int] | None):
    """``(words, tags)`` chunks of a line, each of at most ``window`` tokens (or pieces; a word
    of more pieces than that is a chunk of its own)."""
    if pieces is None:  # slices of ``window`` words: the word-by-word walk below cost most of
        step = max(window, 1)  # a run whose tags came from the cache
        for start in range(0, max(len(line.tokens), 1), step):
            yield line.tokens[start : start + step], line.tags[start : start + step]
        return
    start, used = 0, 0
    for i, word in enumerate(line.tokens):
        cost = pieces[word]
        if used and used + cost > window:
            yield line.tokens[start:i], line.tags[start:i]
            start, used = i, 0
        used += cost
    yield line.tokens[start:], line.tags[start:]


def _sentence(words: list[str], tags: list[str]) -> Sentence:
    if tags[0].startswith("I-"):  # a cut inside concatenated strings starts a new entity
        tags = ["B-" + tags[0][2:], *tags[1:]]
    return Sentence(words, tags)


def syntax_tag_task(
    max_files: int = 60,
    max_eval_files: int = 15,
    window: int = 64,
    root: str | None = None,
    piece_counter=None,
) -> dict[str, list[Sentence]]:
    """Tagged sentences per split from the stdlib corpus.

    Each split takes its first files in sha1-of-path order (a fixed, well-mixed sample):
    ``max_files`` for train, ``max_eval_files`` each for validation and test. ``piece_counter``
    (`piece_counts` of a pretrained encoder's tokenizer) packs ``window`` word pieces, not words.
    """
    caps = {"train": max_files, "validation": max_eval_files, "test": max_eval_files}
    cache = JsonCache("syntax-tags", _generation(), max_entries=TAGS_KEPT)
    tagged: dict[str, list[list[Sentence]]] = {}
    for split, docs in split_documents(list(stdlib_documents(root))).items():
        ordered = sorted(docs, key=lambda d: hashlib.sha1(d.name.encode()).hexdigest())
        tagged[split] = []
        for doc in ordered:
            if len(tagged[split]) == caps[split]:
                break
            try:
                tagged[split].append(_tag_cached(cache, doc.text))
            except (SyntaxError, ValueError, RecursionError, tokenize.TokenError):
                continue
    pieces = None
    if piece_counter is not None:
        words = {w for files in tagged.values() for lines in files for s in lines for w in s.tokens}
        unique = sorted(words)
        pieces = dict(zip(unique, piece_counter(unique)))
    return {
        split: [s for lines in files for s in pack_sentences(lines, window, pieces)]
        for split, files in tagged.items()
    }


@functools.cache
def _generation() -> str | None:
    """What every cached tagging depends on besides the text: this module's code and the exact
    Python (its version string names the build too). None, no caching, where the code cannot be
    read (an install from a zip): another version's entries could not be told apart."""
    try:
        code = Path(__file__).read_bytes()
    except OSError:
        return None
    major, minor = sys.version_info[:2]
    return f"py{major}{minor}-{digest(code, sys.version)[:20]}"


def _tag_cached(cache: JsonCache, text: str) -> list[Sentence]:
    """`tag_source` of ``text`` through the on-disk cache (see module doc). A file that does not
    parse is not cached: it raises on every call, as uncached (a RecursionError depends on the
    process's recursion limit, not on the text alone)."""
    key = digest(text)
    cached = _from_entry(cache.get(key))
    if cached is not None:
        return cached
    sentences = tag_source(text)
    cache.put(key, _to_entry(sentences))
    return sentences


# An entry holds a file's tokens in one flat list, its tags as one letter each ("a" for LABELS[0])
# and each line's length: nested lists of tag strings took JSON five times as long to read.
_TAG_CODE = {label: chr(ord("a") + i) for i, label in enumerate(LABELS)}
_CODE_TAG = {code: label for label, code in _TAG_CODE.items()}


def _to_entry(sentences: list[Sentence]) -> dict:
    return {
        "tokens": [w for s in sentences for w in s.tokens],
        "tags": "".join(_TAG_CODE[t] for s in sentences for t in s.tags),
        "lines": [len(s.tokens) for s in sentences],
    }


def _from_entry(entry) -> list[Sentence] | None:
    """The sentences of an entry `_to_entry` made; None for anything else (absent, a foreign
    value: the entry's checksum already rules out damage)."""
    if not isinstance(entry, dict) or entry.keys() != {"tokens", "tags", "lines"}:
        return None
    tokens, codes, lines = entry["tokens"], entry["tags"], entry["lines"]
    if not (
        isinstance(tokens, list)
        and isinstance(codes, str)
        and isinstance(lines, list)
        and all(type(w) is str for w in tokens)
        and _CODE_TAG.keys() >= set(codes)
        and all(type(n) is int and n > 0 for n in lines)
        and sum(lines) == len(tokens) == len(codes)
    ):
        return None
    tags = [_CODE_TAG[c] for c in codes]
    sentences, at = [], 0
    for n in lines:
        sentences.append(Sentence(tokens[at : at + n], tags[at : at + n]))
        at += n
    return sentences


def _shape(token: str) -> str:
    """The unknown-token id a word falls back to, by its shape (string, number, name, other)."""
    if token[0].isdigit() or (token[0] == "." and token[1:2].isdigit()):
        return "[UNK-NUM]"
    if token.lstrip("rRbBuUfF")[:1] in ("'", '"'):
        return "[UNK-STR]"
    return "[UNK-NAME]" if token.isidentifier() else "[UNK]"


class WordVocab:
    """Word-level vocabulary: special ids first, then the most frequent train tokens."""

    SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[UNK-NAME]", "[UNK-STR]", "[UNK-NUM]")

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.pad_id = self.ids["[PAD]"]

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, sentences: list[Sentence], max_size: int = 8000) -> WordVocab:
        """The ``max_size`` most frequent tokens (ties broken by the token) plus the specials.
        A word of the data that spells a special ("[PAD]", "[SEP]") is not ranked: it took the
        special's id (`encode`), so the word "[PAD]" became padding, masked from attention."""
        counts = Counter(w for s in sentences for w in s.tokens if w not in cls.SPECIALS)
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        return cls([*cls.SPECIALS, *ranked[: max(0, max_size - len(cls.SPECIALS))]])

    def encode(self, sentences: list[Sentence], label2id: dict[str, int], max_len: int) -> dict:
        """``input_ids``, ``attention_mask``, ``labels``: (n, max_len) int64 tensors.

        Each row is ``[CLS] tokens [SEP]`` then padding; tokens past ``max_len - 2`` are dropped.
        Labels of [CLS], [SEP] and padding are -100.
        """
        n = len(sentences)
        input_ids = torch.full((n, max_len), self.pad_id, dtype=torch.long)
        labels = torch.full((n, max_len), IGNORE_INDEX, dtype=torch.long)
        for row, sentence in enumerate(sentences):
            words = sentence.tokens[: max_len - 2]
            ids = [self._word_id(w) for w in words]
            input_ids[row, : len(ids) + 2] = torch.tensor(
                [self.ids["[CLS]"], *ids, self.ids["[SEP]"]]
            )
            labels[row, 1 : len(ids) + 1] = torch.tensor(
                [label2id[t] for t in sentence.tags[: len(ids)]]
            )
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != self.pad_id).long(),
            "labels": labels,
        }

    def _word_id(self, word: str) -> int:
        """The id of a word of the data: its own, else its shape's unknown id; a word that
        spells a special token is unknown, never that token (see `build`)."""
        if word in self.SPECIALS or word not in self.ids:
            return self.ids[_shape(word)]
        return self.ids[word]

    def save(self, path) -> None:
        """UTF-8 whatever the locale: in the locale's encoding, a word that it cannot write
        (Windows' cp1252, an ASCII locale) stopped the run, and a vocabulary written in one
        locale and read in another mapped its accented words to other strings, all unknown."""
        text = json.dumps({"words": self.words}, ensure_ascii=False) + "\n"
        Path(path).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path) -> WordVocab:
        """The vocabulary `save` wrote; a file cut short or edited (not JSON, no list of words,
        a special missing) is a `UsageError` naming it, where it was a traceback from json or a
        KeyError '[PAD]' when a run was evaluated or resumed."""
        if not Path(path).is_file():
            raise UsageError(f"{path}: no word vocabulary; fix: point at the vocab a run saved")
        try:
            words = json.loads(Path(path).read_text(encoding="utf-8"))["words"]
        except (ValueError, KeyError, TypeError) as error:  # not UTF-8 or JSON; no "words"
            problem = type(error).__name__
        else:
            if isinstance(words, list) and all(isinstance(w, str) for w in words):
                missing = [w for w in cls.SPECIALS if w not in words]
                problem = f"no {missing[0]}" if missing else ""
            else:
                problem = "not a list of words"
        if problem:
            raise UsageError(
                f"{path}: the saved word vocabulary is damaged ({problem}); fix: restore the "
                "run's vocab.json"
            )
        return cls(words)


def encode_with_tokenizer(
    tokenizer, sentences: list[Sentence], label2id: dict[str, int], max_len: int
) -> dict:
    """Like `WordVocab.encode` but with a pretrained (fast) Hugging Face tokenizer.

    Words are split into word pieces; a word's label goes on its first piece that holds a
    character of the word, -100 on the rest and on special tokens and padding. Words past
    ``max_len`` pieces are dropped. A word the tokenizer makes no piece of, or only pieces of
    spaces (a zero-width or other Unicode space), is read as its unknown token, so that its label
    is not lost. Each word after a sentence's first has the pieces it has in the running text of
    the words joined by spaces (`_word_separator`).

    Encodings are cached on disk (`_through_cache`): the tokenizer's passes over every word took
    each process that built a task on a pretrained encoder a second or two (each `lowbit compare
    --jobs` worker, each test subprocess).
    """
    inputs = (
        json.dumps([s.tokens for s in sentences], ensure_ascii=False),
        json.dumps([s.tags for s in sentences], ensure_ascii=False),
        json.dumps(list(label2id.items()), ensure_ascii=False),
        str(max_len),
    )
    return _through_cache(
        tokenizer,
        ("encoding", *inputs),
        lambda: _encode_pieces(tokenizer, sentences, label2id, max_len),
        _tensors_to_entry,
        _tensors_from_entry,
    )


def _encode_pieces(
    tokenizer, sentences: list[Sentence], label2id: dict[str, int], max_len: int
) -> dict:
    """`encode_with_tokenizer` without its cache."""
    unique = sorted({w for s in sentences for w in s.tokens})
    # verbose=False: a word's pieces (a long string literal's past the model's length) are
    # counted here, and a sentence's cut at ``max_len`` below, so transformers' warning is noise
    pieces = (
        tokenizer(unique, add_special_tokens=False, verbose=False, **AS_TEXT)["input_ids"]
        if unique
        else []
    )
    word_pieces = {i for ids in pieces for i in ids}
    blank = _blank_pieces(tokenizer, word_pieces)
    empty = {w for w, ids in zip(unique, pieces) if blank.issuperset(ids)}
    if empty and tokenizer.unk_token_id is None:
        raise UsageError(
            f"the tokenizer makes no piece of the word {sorted(empty)[0]!r} (or only pieces of "
            "spaces) and has no unknown token; fix: remove such words from the data"
        )
    separator = _word_separator(tokenizer)
    stand_in = _one_piece_word(tokenizer, separator) if empty else None
    words = [
        [stand_in if w in empty else (separator if i else "") + w for i, w in enumerate(s.tokens)]
        for s in sentences
    ]
    enc = tokenizer(
        words,
        is_split_into_words=True,
        truncation=True,
        max_length=max_len,
        padding="max_length",
        return_tensors="pt",
        **AS_TEXT,
    )
    for row, sentence in enumerate(sentences if empty else []):  # the stand-in's piece: unknown
        for col, word in enumerate(enc.word_ids(row)):
            if word is not None and sentence.tokens[word] in empty:
                enc["input_ids"][row, col] = tokenizer.unk_token_id
    blank |= _blank_pieces(tokenizer, set(enc["input_ids"].flatten().tolist()) - word_pieces)
    rows = []  # built as lists and made a tensor once: a tensor write per word took ~5 us
    for row, (sentence, ids) in enumerate(zip(sentences, enc["input_ids"].tolist())):
        labelled, out = set(), []
        for word, piece in zip(enc.word_ids(row), ids):
            if word is None or word in labelled or piece in blank:
                out.append(IGNORE_INDEX)
            else:
                out.append(label2id[sentence.tags[word]])
                labelled.add(word)
        rows.append(out)
    labels = torch.tensor(rows, dtype=torch.long).reshape(enc["input_ids"].shape)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
    }


TAGS_KEPT = 1024  # syntax-tags entries per generation: ~90 files per corpus root
# word-pieces entries per generation: a run on a new tokenizer adds 3 (its piece counts, the
# train and validation encodings), on a new length or label map 2, of up to 0.45 MB each (MiniLM's
# train split), so 64 keep the last 21 settings at least, in 30 MB at most
PIECES_KEPT = 64
_ENCODED = ("input_ids", "attention_mask", "labels")  # an encoding's tensors, (n, max_len) each
# What the tokenizer object adds to its backend's state (`_tokenizer_state`): padding and truncation
# sides and ids, the unknown id (`_one_piece_word`'s stand-in), decoding (`_blank_pieces`).
_WRAPPER_STATE = (
    "padding_side",
    "truncation_side",
    "pad_token_id",
    "pad_token_type_id",
    "unk_token_id",
    "clean_up_tokenization_spaces",
)


@functools.cache
def _pieces_generation() -> str | None:
    """`_generation` and the versions of transformers and tokenizers: their code splits the words
    and lays out each row (special tokens, truncation, padding)."""
    import tokenizers
    import transformers

    code = _generation()
    return code and f"{code}-{digest(transformers.__version__, tokenizers.__version__)[:12]}"


def _through_cache(tokenizer, inputs: tuple[str, ...], compute, to_entry, from_entry):
    """``compute()``, a function of ``tokenizer`` and ``inputs`` alone, through the on-disk cache
    (`lowbit.data.cache`, ``word-pieces``): ``from_entry`` makes the value of an entry that
    ``to_entry`` made, None for anything else. The tokenizer counts by `_tokenizer_state`; the
    generation is this module's code and the versions of transformers and tokenizers
    (`_pieces_generation`). A tokenizer without a state to read is not cached; with the cache
    off, the state is not read either."""
    if cache_root() is None:
        return compute()
    state = _tokenizer_state(tokenizer)
    cache = JsonCache("word-pieces", _pieces_generation() if state else None, PIECES_KEPT)
    key = digest(state or "", *inputs)
    value = from_entry(cache.get(key))
    if value is None:
        value = compute()
        cache.put(key, to_entry(value))
    return value


def _tokenizer_state(tokenizer) -> str | None:
    """A digest of the tokenizer as it splits words: its backend's serialization (vocabulary,
    normalizer, pre-tokenizer, special-token template, with lowbit's own settings of them) and
    what the Python object adds (`_WRAPPER_STATE`); None for a tokenizer without a backend. Not
    its files or folder: one tokenizer is saved in several layouts, and `load_encoder_tokenizer`
    changes it after loading."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    wrapper = {name: getattr(tokenizer, name, None) for name in _WRAPPER_STATE}
    return digest(
        type(tokenizer).__name__,
        json.dumps(wrapper, sort_keys=True, default=repr),
        _backend_digest(backend),
    )


# `_backend_digest` by backend object, for the process: serializing a Llama-3-size backend (128k
# pieces, 5.5 MB of JSON) took a run a second or more for its piece counts and each split.
_BACKEND_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend_digest(backend) -> str:
    """The digest of ``backend``'s serialization without the truncation and padding that the
    last call left on it (each call sets its own), which are put back as they were. Computed once
    per backend while what can change it in place stays the same (`_backend_changes`)."""
    changes = _backend_changes(backend)
    known = _BACKEND_DIGESTS.get(backend)
    if known is not None and known[0] == changes:
        return known[1]
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        value = digest(backend.to_str())
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)
    _BACKEND_DIGESTS[backend] = (changes, value)
    return value


def _backend_changes(backend) -> tuple:
    """What a backend's owner can change in place, cheap to read (small JSON texts, about a
    millisecond for a Llama-3-size backend): its added tokens (`add_tokens`, a new special
    token), its pipeline's steps (`load_encoder_tokenizer` sets a pre-tokenizer's prefix space),
    its model's kind and size. A model's vocabulary and merges cannot be edited in place (a new
    model of the same kind and size put in its place would go unnoticed)."""
    steps = (backend.normalizer, backend.pre_tokenizer, backend.post_processor, backend.decoder)
    return (
        type(backend.model).__name__,
        backend.get_vocab_size(with_added_tokens=True),
        repr(sorted(backend.get_added_tokens_decoder().items())),
        *(None if step is None else step.__getstate__() for step in steps),
    )


# An entry holds each tensor as the base64 of its little-endian int32 values (ids, which are
# below the vocabulary's size, labels, mask), compressed: lists of numbers took JSON ten times as
# long to read, and the padding made the train split's entry of MiniLM's pieces 4 MB (0.45 MB).
def _tensors_to_entry(encoded: dict) -> dict:
    def text(tensor: torch.Tensor) -> str:
        packed = zlib.compress(tensor.numpy().astype("<i4").tobytes(), 1)
        return base64.b64encode(packed).decode("ascii")

    return {"shape": list(encoded["input_ids"].shape), **{n: text(encoded[n]) for n in _ENCODED}}


def _tensors_from_entry(entry) -> dict | None:
    """The tensors (int64) of an entry `_tensors_to_entry` made; None for anything else (as
    `_from_entry`)."""
    if not isinstance(entry, dict) or entry.keys() != {"shape", *_ENCODED}:
        return None
    shape = entry["shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(type(n) is int and n >= 0 for n in shape)
    ):
        return None
    out = {}
    for name in _ENCODED:
        try:
            data = zlib.decompress(base64.b64decode(entry[name], validate=True))
        except (TypeError, ValueError, zlib.error):  # not a string, not base64, not compressed
            return None
        if len(data) != 4 * shape[0] * shape[1]:
            return None
        values = np.frombuffer(data, dtype="<i4").astype(np.int64)
        out[name] = torch.from_numpy(values).reshape(shape)
    return out


def piece_counts(tokenizer):
    """A function of a list of words to the number of word pieces `encode_with_tokenizer` makes
    of each: the more of its forms first in a sentence and after another word (with
    `_word_separator`), one at least (a word of no piece is read as the unknown token)."""
    separator = _word_separator(tokenizer)

    def count(words: list[str]) -> list[int]:
        if not words:
            return []
        forms = {tuple(words), tuple(separator + w for w in words)}
        encoded = [
            # verbose=False: a long string literal's pieces are counted, not fed to the model
            tokenizer(list(f), add_special_tokens=False, verbose=False, **AS_TEXT)["input_ids"]
            for f in forms
        ]
        return [max(1, *(len(ids[n]) for ids in encoded)) for n in range(len(words))]

    def cached(words: list[str]) -> list[int]:
        """`count` through the cache (`_through_cache`): as slow as encoding, for the same
        reason (a tokenizer pass over every word)."""

        def read(entry):
            valid = isinstance(entry, list) and len(entry) == len(words)
            return entry if valid and all(type(n) is int and n > 0 for n in entry) else None

        inputs = ("piece-counts", json.dumps(words, ensure_ascii=False))
        return _through_cache(tokenizer, inputs, lambda: count(words), list, read)

    return cached


# A word of the data is text: one that spells a special token ("[SEP]", "<s>", a sentence about
# tokenizers) is that token's characters, not the token, which would end or pad the sentence
# mid-way in the encoder's input.
AS_TEXT = {"split_special_tokens": True}


def _one_piece_word(tokenizer, separator: str) -> str:
    """A word the tokenizer makes one piece of, first in a sentence and after another word: the
    stand-in for a word it makes no piece of, replaced by the unknown token once encoded (the
    unknown token's own spelling, as text, is several pieces)."""
    for word in ("a", "x", "0", "the", ".", "I", "e"):
        alone, spaced = tokenizer(
            [[word], [word, separator + word]], is_split_into_words=True, add_special_tokens=False
        )["input_ids"]
        if len(alone) == 1 and len(spaced) == 2:
            return word
    raise UsageError(
        "the tokenizer makes no piece of some words of the data (a zero-width space, say) and "
        "no single piece of any common word to stand in for them; fix: remove such words from "
        "the data"
    )


def _blank_pieces(tokenizer, ids: set[int]) -> set[int]:
    """The ids among ``ids`` of pieces that hold only spaces: byte-level BPE's lone "Ġ", which
    Llama 3 puts before a number (" 1995" is "Ġ" "199" "5"), SentencePiece's lone "▁" before
    Llama 2's digits. Such a piece is the space before a word, not the word: a label on it was a
    label on a position whose input says nothing of the word. Read by decoding, not by the
    piece's spelling, so every family's space marker counts; offsets cannot tell, as a
    SentencePiece "▁" shares its offsets with the character after it."""
    return {i for i in ids if not tokenizer.decode([i]).strip(" ")}


def _word_separator(tokenizer) -> str:
    """``" "`` where the tokenizer, handed a sentence's words one by one, drops the space each
    word after the first has in running text, else ``""``.

    Byte-level BPE after a regex split (Llama 3's, Qwen2's, BLOOM's pre-tokenizer: no prefix space
    of its own) and SentencePiece without a dummy prefix (Gemma's) make "Ġrejects" / "▁rejects" of
    " rejects" in running text but "rej" "ects" of the word alone: a tagger on such an encoder
    trained on pieces it never met in pretraining. Those words are handed over with their space.
    Tokenizers that space every word themselves (RoBERTa's with ``add_prefix_space``, Llama 2's
    "▁" prefix) or split at spaces (BERT's WordPiece) give a lone word the pieces of its spaced
    form, or else running text is not those two forms in a row: they get words as they are. The
    probe reads the tokenizer's behaviour, not its class, so any family is judged alike."""
    words = [["a"], [" a"]]  # a batch of two one-word sentences
    lone, spaced = tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    running = tokenizer("a a", add_special_tokens=False)["input_ids"]
    return " " if lone != spaced and running == lone + spaced else ""
