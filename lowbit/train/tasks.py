"""One class per task: its data, its model, its loss and its evaluation.

A task gives the trainer ``model`` (not yet converted), ``train_batches`` (endless, resumable),
``loss(model, batch) -> (loss, count)``, ``evaluate(model, precision, split)`` and
``report(...)`` (the text the ``eval`` command prints). ``count`` is the number of tokens (or
images) in the batch, for throughput. Artifacts a run needs to be evaluated later (tokenizer,
word vocabulary) are written by ``save_artifacts(folder)`` and read back when ``run_dir`` is given.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.errors import UsageError, pipe_as_data, warn_once, warnings_silenced

IGNORE_INDEX = -100


def build_task(config, run_dir=None) -> Task:
    """The task object of a resolved config (``run_dir``: reuse that run's tokenizer/vocab, checked
    against the sha256 the run recorded of them, `checkpoint.check_run_files`). Checked before
    they are read: a foreign tokenizer of more ids was refused as the --model folder's ("save the
    model's tokenizer into its folder", which would damage it). A file removed since is named by
    its reader, or after the build where the task did without it (labels taken from the data)."""
    from lowbit.models.pretrained import check_export_weights
    from lowbit.train.checkpoint import check_run_files

    if run_dir is None:  # a new run: an export's weights are what it fine-tunes
        check_export_weights(config.model)
    else:
        check_run_files(run_dir, config, removed=False)
    task = _task_class(config)(config, run_dir)
    if run_dir is not None:
        check_run_files(run_dir, config)
    return task


def _task_class(config) -> type[Task]:
    return {
        "causal-lm": CausalLMTask,
        "token-classification": TokenClassificationTask,
        "image-classification": ImageClassificationTask,
    }[config.task]


def run_file_names(config) -> tuple[str, ...]:
    """The files in a run folder that the task of ``config`` reads again at every load (those its
    `Task.save_artifacts` writes), by path in the folder: what `checkpoint.run_files_record`
    hashes. A file of another task's (a tagger's vocab.json beside a causal LM) is never read."""
    return _task_class(config).artifact_names(config)


def data_fingerprint(task: str, data: str | None, text_field: str = "text") -> dict | None:
    """The fingerprint (as run.json records it) of what a task's data holds now, read without
    building a model; None for data that comes with lowbit (the digits, the syntax-tag task)."""
    if task == "causal-lm":
        from lowbit.data import load_corpus

        return load_corpus(data, text_field).fingerprint
    if task == "token-classification" and data is not None:
        return _sentences_fingerprint(data, conll_splits(data))
    return None


def same_data(recorded: dict | None, current: dict | None) -> bool:
    """Whether two data fingerprints describe the same contents (wherever they were read from);
    True when either is unknown (a run from before fingerprints, built-in data)."""
    if not recorded or not current:
        return True

    def contents(fingerprint: dict) -> dict:
        return {key: value for key, value in fingerprint.items() if key != "source"}

    return contents(recorded) == contents(current)


def check_inputs(config, resume: bool) -> None:
    """Refuse, in seconds and without building a model or reading all of the data, the inputs
    that a run's `Trainer` refuses only as it sets up: for the `--nproc` launcher before its ranks
    start (each had imported torch and joined a process group first), for `lowbit compare --jobs`
    before the study writes anything (a worker refused them after). A causal LM's --model folder
    (`folder_config`, what `load_causal_lm` reads before the weights) and its positions against
    --seq-len (`check_positions`); a new run's table (`check_not_tables`), and the --data as far
    as it shows without reading it all (`check_quickly`: its full read, ~2 minutes a GB, is the
    run's). A tagger's CoNLL data is read as its task does (`data_fingerprint`), its warnings left
    for the run (`warnings_silenced`: said here, by a process that trains nothing, the run never
    said them). Left to the run's set-up: what needs its tokenizer or built model
    (a causal LM's data shorter than one window and its --model folder's weights, a tagger's
    --model folder, the model's memory, which `preflight` checks)."""
    from lowbit.data import corpus
    from lowbit.models import causal_lm

    if config.task == "causal-lm":
        causal_lm.check_positions(causal_lm.model_positions(config.model), config.seq_len)
        if not resume:
            corpus.check_not_tables(config.data)
        corpus.check_quickly(config.data, config.text_field)
    elif config.task == "token-classification" and config.data is not None:
        with warnings_silenced():
            data_fingerprint(config.task, config.data, config.text_field)


class Task:
    unit = "tok"  # what ``count`` counts, for "tok/s"
    fingerprint: dict | None = None

    def __init__(self, config, run_dir=None):
        self.config = config

    def save_artifacts(self, folder) -> None:
        pass

    @staticmethod
    def artifact_names(config) -> tuple[str, ...]:
        """The files `save_artifacts` may write, which a load of the run reads (`run_file_names`)."""
        return ()

    def steps_per_epoch(self) -> int:
        """Optimizer steps that see every training example (or token) about once."""
        raise NotImplementedError

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's `loss_terms`, tokens or images counted for throughput)."""
        raise NotImplementedError

    def loss_terms(self, batch) -> int | None:
        """How many terms the batch's mean loss averages, where batches hold different numbers
        (a tagger's labelled words): micro-batches and ranks are weighted by them. None: every
        batch holds as many (an LM's full windows, full image batches)."""
        return None

    def evaluate(self, model, precision, split: str = "validation", max_batches=None) -> dict:
        raise NotImplementedError

    def eval_rows(self, split: str) -> int:
        """How many examples (an LM's windows) an evaluation of all of ``split`` batches up."""
        raise NotImplementedError

    def eval_batch_count(self, split: str, max_batches=None) -> int:
        """The batches `report` (and `evaluate` with ``max_batches or 0``) runs on ``split``: all
        of it, or ``max_batches`` of them (for `lowbit eval`'s progress bar and note)."""
        whole = math.ceil(self.eval_rows(split) / self.config.batch_size)
        return min(whole, max_batches) if max_batches else whole

    def use_eval_data(self, path: str, split: str, text_field: str | None = None) -> None:
        """Evaluate ``split`` on the data at ``path`` instead of the run's own (`lowbit eval
        --data`): a single file whole, a folder's or a glob's ``split`` (`evaluated_whole`);
        with the run's tokenizer or vocabulary, tags and --seq-len. ``text_field``: the JSON
        records' field of a causal LM's data (None: the run's --text-field). Nothing of the
        run's folder is written."""
        raise UsageError(
            f"--data {path}: task {self.config.task} evaluates on its built-in data only; "
            "fix: drop --data"
        )

    def report(self, model, precision, split: str, max_batches=None) -> tuple[dict, str]:
        """(metrics, printable report) from one pass over ``split``'s batches; a classifier's
        metrics add ``per_label_f1`` (`lowbit.data.label_report.f1_rows`), the rows of its table
        (a tagger's ``per_entity_f1`` too, its entity table's), so that neither
        ``lowbit eval --json`` nor a folder's comparison runs the model again."""
        metrics = self.evaluate(model, precision, split, max_batches or 0)  # 0: every batch
        return metrics, format_metrics(metrics)


def evaluated_whole(data: str) -> bool:
    """Whether `lowbit eval --data` ``data`` is evaluated whole: a single file is, every document
    (or sentence) of it; a folder or a glob splits as training data does, and its ``--split`` is
    evaluated. The one rule of the data read (`Task.use_eval_data`), of what the report's head,
    its --json ``split`` (null for a file alone), the note and the progress bar name, and of the
    warnings: a glob was said to be a whole file, where its validation split was evaluated."""
    return Path(data).is_file()


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k} {metric_text(v)}" for k, v in metrics.items())


def metric_text(value, form: str = ".4f") -> str:
    """A metric as reports print it: a float to ``form``, None (a metric that does not apply:
    entity F1 of sentences without entities) as ``n/a``, any other value as it is."""
    if value is None:
        return NOT_APPLICABLE
    return format(value, form) if isinstance(value, float) else str(value)


NOT_APPLICABLE = "n/a"


@contextlib.contextmanager
def evaluating(model, precision):
    """Eval mode, no grad, the recipe's autocast; restores train mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), precision.autocast():
            yield
    finally:
        model.train(was_training)


def to_device(batch, device):
    return tuple(t.to(device, non_blocking=True) for t in batch)


# --------------------------------------------------------------------------------------- causal-lm


# A model whose embedding lacks ids of its Hugging Face tokenizer (tokens added to the tokenizer
# after the model was made): what brings the two together.
RESIZE_FIX = (
    "resize the model's embeddings to the tokenizer "
    "(model.resize_token_embeddings(len(tokenizer))) and save it"
)


class HFTokenizer:
    """Adapter giving a Hugging Face tokenizer the interface of `lowbit.data` tokenizers."""

    kind = "hf"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eot_id = tokenizer.eos_token_id
        if self.eot_id is None:  # id 0 separates documents and ends samples: a real token here
            self.eot_id = 0
            print(
                f"lowbit: warning: the tokenizer has no end-of-text token; documents are joined "
                f"with id 0 ({tokenizer.convert_ids_to_tokens(0)!r}) and generation stops at it; "
                "fix: set its eos_token and save it into the model folder",
                file=sys.stderr,
            )
        self.vocab_size = len(tokenizer)
        # the rows of a model's embedding that has fewer than the tokenizer's ids (set by
        # `CausalLMTask`): a text holding an id from there up is refused, not an IndexError
        self.rows: int | None = None

    def _ids(self, text: str) -> list[int]:
        # verbose=False: no warning that a document is longer than the model's positions; the
        # trainer cuts the ids into windows of --seq-len, which is checked against them
        return self._tok.encode(text, add_special_tokens=False, verbose=False)

    def encode(self, text: str) -> list[int]:
        ids = self._ids(text)
        if found := self.lacking(ids):
            raise UsageError(f"the text holds {found}; fix: remove it, or {RESIZE_FIX}")
        return ids

    def encode_documents(self, texts):
        """The texts' ids joined by ``eot_id``, unchecked: `CausalLMTask.tokens` names the
        split of an id the model lacks. Each text's ids are an int32 array as soon as made: one
        list of every id as Python ints took 239 MiB more at the peak for the 8.8M tokens of a
        50 MB file (session 42)."""
        import numpy as np

        from lowbit.data.tokenizers import join_documents

        parts = (np.asarray(self._ids(text), dtype=np.int32) for text in texts)
        return join_documents(parts, self.eot_id)

    def lacking(self, ids) -> str | None:
        """The first of ``ids`` that the model's embedding has no row for, in words; None if none."""
        if self.rows is None:
            return None
        ids = torch.as_tensor(ids)
        beyond = ids[ids >= self.rows]
        if not len(beyond):
            return None
        first = int(beyond[0])
        return (
            f"the token {self.token(first)!r} (id {first}), which the model's embedding of "
            f"{self.rows} ids lacks"
        )

    def decode(self, ids) -> str:
        """The text of ``ids`` as the tokens spell it. No clean-up of spaces: a tokenizer_config
        with ``clean_up_tokenization_spaces`` (many Hub models') would turn the sampled " ." into
        "." (and for a BPE tokenizer, which transformers spares, log a warning on each run)."""
        return self._tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)

    def token(self, token_id: int) -> str:
        """The token of ``token_id`` as the vocabulary spells it (for messages)."""
        return self._tok.convert_ids_to_tokens(token_id)

    def save(self, folder) -> None:
        self._tok.save_pretrained(folder)


# The files that bring a causal LM's tokenizer: lowbit's own, then those of `TOKENIZER_FILES`
# (lowbit.models.pretrained) that hold a vocabulary or say where it is (tokenizer_config.json).
# special_tokens_map.json, added_tokens.json or merges.txt alone hold none: a folder with only
# those brings no tokenizer (review R7: it was refused as "the tokenizer is damaged").
VOCABULARY_FILES = (
    "lowbit_tokenizer.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
)


def model_tokenizer_file(model: str) -> Path | None:
    """The tokenizer file a causal LM's folder brings (lowbit's own, or a Hugging Face one), which
    the run then uses instead of --tokenizer; None for a named size or a folder without one. A
    lowbit run folder, or a path in one, is refused as no model (`run_as_model`) first: a
    tagger run's vocab.json was read as the model's tokenizer, "the tokenizer is damaged".
    Looked for: lowbit's own file, then the files transformers reads a vocabulary from
    (`VOCABULARY_FILES`): GPT-2's vocab.json, a SentencePiece tokenizer.model (Llama 1/2) or BERT's
    vocab.txt come without tokenizer.json in older checkpoints, and read as "no tokenizer" such a
    model was fine-tuned on byte ids its embedding never saw (a folder with vocab.txt was told it
    had "no tokenizer files")."""
    from lowbit.models.pretrained import run_as_model

    if not (Path(model) / "config.json").is_file() and (refusal := run_as_model(model)):
        raise refusal
    for name in VOCABULARY_FILES:
        if (Path(model) / name).is_file():
            return Path(model) / name
    return None


def _hf_tokenizer(folder: Path, fix: str) -> HFTokenizer:
    """The Hugging Face tokenizer saved in ``folder``, or a one-line error ending in ``fix``:
    transformers raises many types (JSONDecodeError, KeyError, OSError, ...) for files it cannot
    read, and builds a tokenizer of the special tokens alone from a tokenizer_config.json without
    vocabulary files, which would have turned every word of the text into the unknown token."""
    from transformers import AutoTokenizer

    from lowbit.models.pretrained import check_sentencepiece

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:
        check_sentencepiece(folder)
        raise UsageError(
            f"{folder}: the tokenizer is damaged ({' '.join(str(error).split())[:120]}); fix: {fix}"
        ) from None
    if set(tokenizer.get_vocab()) <= set(tokenizer.all_special_tokens):
        raise UsageError(
            f"{folder}: the tokenizer holds only its special tokens (no vocabulary file that "
            f"{type(tokenizer).__name__} reads); fix: {fix}"
        )
    return HFTokenizer(tokenizer)


def causal_lm_tokenizer(config, run_dir, corpus):
    """The run's tokenizer: saved with the run, the checkpoint's own, or built from config.

    A run folder (``run_dir``) always holds the tokenizer its model was trained with; one that
    lost it is refused rather than given a tokenizer built again, whose ids could differ.
    """
    from lowbit.data import build_tokenizer, load_tokenizer
    from lowbit.models.pretrained import load_config

    if run_dir is not None:
        folder = Path(run_dir) / "tokenizer"
        if (folder / "lowbit_tokenizer.json").is_file():
            return load_tokenizer(folder)
        if not folder.is_dir():
            raise UsageError(
                f"{run_dir}: no saved tokenizer ({folder}); fix: restore the run's tokenizer folder"
            )
        return _hf_tokenizer(folder, "restore the run's tokenizer folder")
    own = model_tokenizer_file(config.model)
    if own is not None and own.name == "lowbit_tokenizer.json":
        return load_tokenizer(own.parent)
    if own is not None:
        if (own.parent / "config.json").is_file():  # named in one line before transformers'
            load_config(own.parent)  # tokenizer reads it (and logs of an unknown model_type)
        return _hf_tokenizer(own.parent, "save the model's tokenizer into its folder again")
    if config.tokenizer == "bpe":
        tokenizer = build_tokenizer("bpe", corpus().texts("train"), config.vocab_size)
        if tokenizer.vocab_size < config.vocab_size:
            warn_once(
                f"BPE learned {tokenizer.vocab_size} ids, not the "
                f"--vocab-size {config.vocab_size} asked: the training text holds no more merges "
                "(the model is built for the ids learned); fix: more text or a smaller --vocab-size"
            )
        return tokenizer
    return build_tokenizer("byte")


def _warn_untokenized_weights(config) -> None:
    """Warn where the --model folder holds trained weights but no tokenizer files (a
    ``model.save_pretrained`` without ``tokenizer.save_pretrained``): its embedding rows stand for
    its own tokenizer's tokens, and the run feeds it lowbit's byte or BPE ids instead. Called
    once the model is built from them: a folder whose weights are refused (torn) says only why."""
    from lowbit.models.causal_lm import SIZES
    from lowbit.models.pretrained import has_weights

    folder = Path(config.model)
    if config.model in SIZES or not folder.is_dir() or model_tokenizer_file(config.model):
        return
    if has_weights(folder):
        warn_once(
            f"{folder} holds weights but no tokenizer files, so the run "
            f"feeds it --tokenizer {config.tokenizer} ids its embedding was not trained on; fix: "
            "save the model's tokenizer into the folder (tokenizer.save_pretrained), or "
            "remove its weights to train the architecture from a fresh initialization"
        )


class CausalLMTask(Task):
    """Next-token prediction on a text corpus (the stdlib by default) with a Llama-style decoder."""

    def __init__(self, config, run_dir=None):
        from lowbit.models import build_model
        from lowbit.models.causal_lm import text_config

        super().__init__(config)
        self._corpus = None
        self._eval_source: str | None = None  # `use_eval_data`'s data, evaluated instead
        self.tokenizer = causal_lm_tokenizer(config, run_dir, lambda: self.corpus)
        self.model = build_model(
            "causal-lm",
            config.model,
            vocab_size=self.tokenizer.vocab_size,
            max_seq_len=config.seq_len,
            seed=config.seed,
        )
        vocab_size = text_config(self.model.config).vocab_size
        if vocab_size < self.tokenizer.vocab_size:
            self._check_vocabulary(vocab_size)
        if run_dir is None:  # a new run: its tokenizer was not saved with it
            _warn_untokenized_weights(config)
        self._tokens: dict[str, torch.Tensor] = {}
        self._train_batches = None

    def _check_vocabulary(self, rows: int) -> None:
        """A tokenizer with more ids than the model's embedding has ``rows``. lowbit's own use
        every id: refused. A Hugging Face tokenizer's extra ids are most often tokens added after
        the model was made (a pad token saved without resizing the embedding), which texts do not
        hold: warned about, and `tokens` refuses a text that holds one. Its end-of-text id joins
        every two documents: refused where the embedding lacks it."""
        tokenizer, model = self.tokenizer, self.config.model
        if tokenizer.kind != "hf":
            raise UsageError(
                f"{model}: vocabulary of {rows} ids is smaller than "
                f"the {tokenizer.kind} tokenizer's {tokenizer.vocab_size}; fix: save the "
                "model's tokenizer into its folder or choose a smaller tokenizer"
            )
        if tokenizer.eot_id >= rows:
            raise UsageError(
                f"{model}: the tokenizer's end-of-text token {tokenizer.token(tokenizer.eot_id)!r} "
                f"(id {tokenizer.eot_id}) has no row in the model's embedding of {rows} ids, and "
                f"it joins the documents; fix: {RESIZE_FIX}"
            )
        extra = range(rows, tokenizer.vocab_size)
        names = ", ".join(repr(tokenizer.token(i)) for i in extra[:3]) + ", ..." * (len(extra) > 3)
        ids = (
            f"id {rows} ({names}) has"
            if len(extra) == 1
            else f"ids {rows}..{extra[-1]} ({names}) have"
        )
        warn_once(
            f"{model}: the tokenizer has {tokenizer.vocab_size} ids, the model's "
            f"embedding {rows}: {ids} no row, and a text that holds one is refused; "
            f"fix: {RESIZE_FIX}"
        )
        tokenizer.rows = rows

    @property
    def corpus(self):
        """The text, read when first needed: sampling from a trained run needs only its
        tokenizer, so `lowbit generate` works where the training data is not."""
        if self._corpus is None:
            from lowbit.data import load_corpus

            self._corpus = load_corpus(self.config.data, self.config.text_field)
        return self._corpus

    @property
    def fingerprint(self) -> dict:
        return self.corpus.fingerprint

    @property
    def train_batches(self):
        if self._train_batches is None:
            from lowbit.data import LMBatches

            c = self.config
            self._train_batches = LMBatches(self.tokens("train"), c.batch_size, c.seq_len, c.seed)
        return self._train_batches

    @train_batches.setter
    def train_batches(self, batches) -> None:  # a data-parallel rank's shard (the trainer)
        self._train_batches = batches

    def sample_prompt(self) -> str:
        """Where the end-of-run sample starts: ``def`` on the standard library's Python, else the
        first words of the first validation document, so the sample continues the user's text."""
        if self.config.data in (None, "stdlib"):
            return "def "
        words = self.corpus.texts("validation")[0].split()[:3]
        return " ".join(words) + " " if words else ""

    def tokens(self, split: str) -> torch.Tensor:
        from lowbit.data import tokenize_split

        if split not in self._tokens:
            tokens = tokenize_split(self.tokenizer, self.corpus.texts(split))
            if self.tokenizer.kind == "hf" and (found := self.tokenizer.lacking(tokens)):
                raise UsageError(
                    f"{self.corpus.source}: the {split} split holds {found}; fix: remove it from "
                    f"the text, or {RESIZE_FIX}"
                )
            window = self.config.seq_len + 1
            if len(tokens) < window:
                raise UsageError(self._too_short(split, len(tokens), window))
            self._tokens[split] = tokens
        return self._tokens[split]

    def _too_short(self, split: str, count: int, window: int) -> str:
        """The refusal of a split shorter than one window. `lowbit eval --data` keeps the run's
        --seq-len (it has no such flag), so its fix is more text, and it names the user's data
        (a file is evaluated whole, not as a split)."""
        if self._eval_source is None:
            return (
                f"{self.corpus.source}: the {split} split holds {count} tokens, fewer than one "
                f"window of --seq-len + 1 = {window}; fix: use more data or a shorter --seq-len"
            )
        where = self._eval_source
        if not evaluated_whole(where):
            where += f": the {split} split"
        return (
            f"--data {where} holds {count} tokens, fewer than one window of the run's --seq-len "
            f"+ 1 = {window}; fix: give at least {window} tokens of text (lowbit eval keeps the "
            "run's --seq-len)"
        )

    def use_eval_data(self, path: str, split: str, text_field: str | None = None) -> None:
        from lowbit.data.corpus import SPLITS, Corpus, load_texts

        text_field = text_field or self.config.text_field
        if evaluated_whole(path):  # the file itself, every document (paragraph, JSONL record)
            documents = load_texts(path, text_field)
            self._corpus = Corpus(str(path), {s: documents if s == split else [] for s in SPLITS})
        else:  # a folder (or glob) splits as training data does: its ``split``
            from lowbit.data import load_corpus

            self._corpus = load_corpus(path, text_field)
        self._eval_source = str(path)
        self._tokens.clear()

    def save_artifacts(self, folder) -> None:
        self.tokenizer.save(Path(folder) / "tokenizer")

    @staticmethod
    def artifact_names(config) -> tuple[str, ...]:
        from lowbit.models.pretrained import TOKENIZER_FILES

        names = dict.fromkeys((*VOCABULARY_FILES, *TOKENIZER_FILES))  # lowbit's or Hugging Face's
        return tuple(f"tokenizer/{name}" for name in names)

    def steps_per_epoch(self) -> int:
        c = self.config
        return max(1, len(self.tokens("train")) // (c.batch_size * c.seq_len * c.grad_accum))

    def loss(self, model, batch):
        input_ids, labels = batch
        logits = model(input_ids=input_ids, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()), input_ids.numel()

    def eval_rows(self, split: str) -> int:
        return (len(self.tokens(split)) - 1) // self.config.seq_len  # `eval_batches`' windows

    def evaluate(self, model, precision, split="validation", max_batches=None):
        from lowbit.data import eval_batches

        c = self.config
        limit = c.eval_batches if max_batches is None else (max_batches or None)
        batches = eval_batches(self.tokens(split), c.batch_size, c.seq_len, limit)
        total, count = 0.0, 0
        device = next(model.parameters()).device
        with evaluating(model, precision):
            for batch in batches:
                input_ids, labels = to_device(batch, device)
                logits = model(input_ids=input_ids, use_cache=False).logits
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"
                )
                total += loss.item()
                count += labels.numel()
        loss = total / count
        return {"loss": loss, "ppl": _perplexity(loss), "tokens": count}


def _perplexity(loss: float) -> float:
    """``exp(loss)``, inf past float64's range (a loss above ~709.78) and NaN for a NaN loss. It
    was ``exp(min(loss, 50))``: a diverged model's loss of 1016 printed a perplexity of
    5.18e21, a finite number that read as measured, in eval, metrics.jsonl and comparisons."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------- token classification


def conll_splits(path: str) -> dict:
    """Sentences per split from a folder of train/dev/test CoNLL files (or CoNLL-2003's
    *.train/*.testa/*.testb; `lowbit.data.conll.conll_split_of` says which names count), or one
    file split by rule."""
    from lowbit.data.conll import read_conll_folder

    source = Path(path)
    if source.is_dir():
        return read_conll_folder(source)
    if source.is_file():
        return _split_conll_file(source)
    if source.exists():
        raise pipe_as_data(path, "CoNLL text")
    instead = "give the folder that holds its train, dev and test files, or one CoNLL file"
    if glob.has_magic(path) and glob.glob(path):  # causal-lm's --data takes one: "no such file"
        raise UsageError(
            f"{path}: a glob, which token-classification data is not read from; fix: {instead}"
        )
    # a path that matches nothing is told as one, whatever its characters: a mistyped path
    # holding [ or ? (data[1]) was called a glob
    also = f" (a glob is not read: {instead})" if glob.has_magic(path) else ""
    raise UsageError(f"{path}: no such CoNLL file or folder; fix: check the data path{also}")


def split_rule_note(config) -> str:
    """A note for a data fingerprint that no longer matches the run's, where the data may be
    unchanged and read otherwise: one CoNLL file with several documents splits by document (it
    split by sentence before), which changes the splits of runs made before."""
    if config.task == "token-classification" and config.data and Path(config.data).is_file():
        return " (if the file is unchanged: one CoNLL file now splits by -DOCSTART- document)"
    return ""


def _split_conll_file(source: Path) -> dict:
    """One CoNLL file's sentences split by rule: whole documents (``-DOCSTART-`` blocks) where
    the file has several, so that no document lends sentences, and with them its names and
    phrases, to both training and validation; else sentence by sentence. A unit is named by the
    index of its first sentence in the file (`split_of` of ``"<file>:<index>"``)."""
    from lowbit.data import read_conll_documents, split_of
    from lowbit.data.conll import TREEBANK_EXTENSIONS

    documents = read_conll_documents(source)
    by_document = len(documents) > 1  # else no -DOCSTART- line, or one at the top
    if not by_document:
        documents = [[sentence] for sentence in documents[0]]
    out = {"train": [], "validation": [], "test": []}
    first = 0
    for document in documents:
        out[split_of(f"{source.name}:{first}")] += document
        first += len(document)
    unit = "documents" if by_document else "sentences"
    marks = "# newdoc" if source.suffix.lower() in TREEBANK_EXTENSIONS else "-DOCSTART-"
    remedy = f", or drop the {marks} lines to split by sentence" if by_document else ""
    for split, part in out.items():
        if not part:
            raise UsageError(
                f"{source}: too few {unit} ({len(documents)}) to fill a {split} split; fix: "
                f"give more {unit} or a folder with train/dev/test files{remedy}"
            )
    return out


class TokenClassificationTask(Task):
    """Per-token tags (CoNLL/IOB files, or the built-in Python syntax-tag task) with a BERT encoder."""

    def __init__(self, config, run_dir=None):
        from lowbit.data import WordVocab
        from lowbit.models import build_token_classifier, load_encoder_tokenizer
        from lowbit.models.token_classifier import SIZES

        super().__init__(config)
        if config.seq_len < 3:
            raise UsageError(f"seq_len {config.seq_len} leaves no room for tokens; fix: raise it")
        pretrained = config.model not in SIZES  # a folder (or minilm) with its own tokenizer
        tokenizer = None  # the pretrained encoder's, once loaded (the built-in task's packing)
        self.run_dir = run_dir
        self.run_given = run_dir is not None  # a run that exists: its --seq-len is fixed
        self._sentences: dict | None = None  # CoNLL data: read when first needed (`sentences`)
        self._eval_source: str | None = None  # `use_eval_data`'s file, evaluated instead
        self._fingerprint: dict | None = None  # of the run's data, worked out once
        if config.data is None:
            model = config.model if pretrained else None
            self._sentences, tokenizer = _syntax_tags(config.seq_len, model)
            self._fingerprint = {"source": "syntax-tags(stdlib)"}
            if pretrained:  # packed by word pieces since session 29 (before: by words)
                self._fingerprint["packing"] = "word pieces"
        # a run's labels.json (and vocab.json) build its model without its data: `lowbit
        # quantize` of a tagger whose CoNLL files moved failed with "no such CoNLL file"
        saved = _saved_labels(run_dir)
        self.labels = saved if saved is not None else self._data_labels()
        if not self.run_given:  # a new run is told of every split as it starts
            self._warn_data(("validation", "test"))
        self.label2id = {label: i for i, label in enumerate(self.labels)}
        self.id2label = dict(enumerate(self.labels))
        if not pretrained:
            vocab_path = Path(run_dir or "", "vocab.json")
            if run_dir is not None and vocab_path.is_file():
                self.vocab = WordVocab.load(vocab_path)
            else:
                self.vocab = WordVocab.build(self.sentences["train"])
            self._encode = lambda s: self.vocab.encode(s, self.label2id, config.seq_len)
            vocab_size = len(self.vocab)
        else:
            self.vocab = None
            if tokenizer is None:
                tokenizer = load_encoder_tokenizer(config.model)
            self._encode = lambda s: _encode_pretrained(tokenizer, s, self.label2id, config)
            vocab_size = None
        self.model = build_token_classifier(
            config.model,
            self.labels,
            vocab_size=vocab_size,
            seed=config.seed,
            max_seq_len=config.seq_len,
        )
        if pretrained and not self.run_given:  # a new run's choice of model, told as it starts
            _warn_left_context(config.model, self.model, config.seq_len)
        self._encoded: dict[str, tuple] = {}
        self._cut: dict[str, int] = {}  # per split: its sentences that lose words to --seq-len
        self._train_batches = None
        if not self.run_given:  # a run resumed or evaluated was told as its training started
            self._encoding("train")
            self._warn_cut("train", "training")

    def _data_labels(self) -> list[str]:
        """The tags of the data, "O" first: the built-in task's, else those of every split."""
        from lowbit.data import LABELS

        if self.config.data is None:
            return list(LABELS)
        tags = {t for part in self.sentences.values() for s in part for t in s.tags}
        return ["O", *sorted(tags - {"O"})]

    @property
    def sentences(self) -> dict:
        """The sentences of each split, the run's CoNLL data read when first needed; a run's
        data that gained a tag it did not train with is refused (`_check_run_labels`)."""
        if self._sentences is None:
            data = self.config.data
            if self.run_given and not Path(data).exists() and self._is_run_data(data):
                from lowbit.infer.io import training_run

                # a run without labels.json reads its tags from this data, even to evaluate
                # other data: no --data helps it
                why = "; the run predates labels.json, so its tags come from its data"
                other = ""
                if _saved_labels(self.run_dir) is not None:
                    why = ""
                    other = f" (to evaluate on other data: lowbit eval {self.run_dir} --data PATH)"
                raise UsageError(
                    f"{data}: no such CoNLL file or folder (the data {training_run(self.run_dir)} "
                    f"was trained on, moved or deleted since{why}); fix: restore it there{other}"
                )
            self._sentences = conll_splits(data)
            if self.run_given:
                _check_run_labels(self.run_dir, self._data_labels())
        return self._sentences

    def _is_run_data(self, data: str) -> bool:
        """Whether ``data`` is what the run (of a quantized/pruned folder: its source) trained
        on, as its run.json recorded it: `lowbit doctor --checkpoint RUN --data` reads its own."""
        from lowbit.infer.io import training_run
        from lowbit.train.config import read_run_info
        from lowbit.train.trainer import data_path

        return data_path(data) == read_run_info(training_run(self.run_dir)).get("data_path")

    @property
    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = _sentences_fingerprint(self.config.data, self.sentences)
        return self._fingerprint

    @property
    def train_batches(self):
        if self._train_batches is None:
            from lowbit.data import TensorBatches

            c = self.config
            self._train_batches = TensorBatches(
                self._encoding("train"), c.batch_size, c.seed, c.grad_accum
            )
        return self._train_batches

    @train_batches.setter
    def train_batches(self, batches) -> None:  # a data-parallel rank's shard (the trainer)
        self._train_batches = batches

    def use_eval_data(self, path: str, split: str, text_field: str | None = None) -> None:
        """Tags the run did not train with are warned of, and given ids past the model's
        outputs: their words count as errors (and their entities as missed), out of the loss."""
        from lowbit.data.conll import read_conll, read_conll_folder

        whole = evaluated_whole(path)
        if whole:
            sentences = read_conll(path)
        elif Path(path).is_dir():  # the split's files alone: a folder of dev.txt and test.txt
            sentences = read_conll_folder(path, (split,))[split]
        else:  # refused there, as training refuses it (a glob, a path that names nothing)
            sentences = conll_splits(path)[split]
        if not sentences:
            raise UsageError(f"{path}: no sentences to evaluate; fix: give a CoNLL file of tags")
        self._sentences, self._eval_source = {split: sentences}, str(path)
        self._encoded.clear()
        self._cut.clear()
        where = "the file" if whole else f"the {split} split"
        extra = _warn_untrained_tags(path, set(self.labels), {where: sentences})
        for tag in extra:
            self.label2id[tag] = len(self.label2id)
        self.id2label = {i: label for label, i in self.label2id.items()}

    def _encoding(self, split):
        if split not in self._encoded:
            enc = self._encode(self.sentences[split])
            self._encoded[split] = (enc["input_ids"], enc["attention_mask"], enc["labels"])
            self._cut[split] = _cut_sentences(self.sentences[split], enc["labels"])
        return self._encoded[split]

    def encoded(self, split):
        """``split`` encoded for evaluation; its sentences cut by --seq-len are told (once), and
        for a run that exists, the data's warnings of this split alone (`lowbit eval --split
        test` told of the validation split's tags)."""
        out = self._encoding(split)
        self._warn_cut(split, "the metrics")
        if self.run_given:
            self._warn_data((split,))
        return out

    def _warn_data(self, splits) -> None:
        """The CoNLL data's warnings of ``splits``: tags not trained, another IOB scheme."""
        if self._eval_source is not None:  # told by `use_eval_data`
            return
        if self.config.data is not None:  # the built-in task's tags are all trained
            trained = {tag for sentence in self.sentences["train"] for tag in sentence.tags}
            named = {f"the {split} split": self.sentences.get(split, []) for split in splits}
            _warn_untrained_tags(self.config.data, trained, named)
            _warn_other_scheme(self.config.data, self.sentences, splits)

    def _warn_cut(self, split: str, left_out: str) -> None:
        from lowbit.models.token_classifier import encoder_positions

        if self._cut[split]:
            sentences = f"{split} sentences"
            if self._eval_source is not None:  # `lowbit eval --data`: the user's data, named
                whole = evaluated_whole(self._eval_source)  # not the split it stands in for
                sentences = f"{'sentences' if whole else sentences} of {self._eval_source}"
            _warn_truncated(
                sentences,
                self._cut[split],
                len(self.sentences[split]),
                self.config.seq_len,
                encoder_positions(self.model),
                self.run_given,
                left_out,
            )

    def save_artifacts(self, folder) -> None:
        (Path(folder) / LABELS_FILE).write_text(json.dumps(self.labels) + "\n", encoding="utf-8")
        if self.vocab is not None:
            self.vocab.save(Path(folder) / "vocab.json")

    @staticmethod
    def artifact_names(config) -> tuple[str, ...]:
        from lowbit.models.token_classifier import SIZES

        # a pretrained encoder reads its tokenizer from its --model folder (`check_model_folder`)
        return (LABELS_FILE,) if config.model not in SIZES else (LABELS_FILE, "vocab.json")

    def steps_per_epoch(self) -> int:
        return self.train_batches.steps_per_epoch // self.config.grad_accum  # whole steps

    def loss(self, model, batch):
        input_ids, mask, labels = batch
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
        )
        return loss, int(mask.sum())

    def loss_terms(self, batch) -> int:
        return int((batch[2] != IGNORE_INDEX).sum())  # a word's first piece; padding is ignored

    def eval_rows(self, split: str) -> int:
        return len(self.encoded(split)[0])

    def predict(self, model, precision, split, max_batches=None):
        from lowbit.data import fixed_batches

        batches = fixed_batches(self.encoded(split), self.config.batch_size)
        if max_batches:
            batches = batches[:max_batches]
        device = next(model.parameters()).device
        total, count, labels_all, preds_all = 0.0, 0, [], []
        with evaluating(model, precision):
            for batch in batches:
                input_ids, mask, labels = to_device(batch, device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
                # a tag the model has no output for (`use_eval_data`) is no term of the loss
                scored = labels.masked_fill(labels >= logits.shape[-1], IGNORE_INDEX)
                total += F.cross_entropy(
                    logits.flatten(0, 1),
                    scored.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).item()
                count += int((scored != IGNORE_INDEX).sum())
                labels_all.append(labels.cpu())
                preds_all.append(logits.argmax(-1).cpu())
        return total / max(count, 1), torch.cat(labels_all), torch.cat(preds_all)

    def _scores(self, model, precision, split, max_batches):
        from lowbit.data import aligned_tags, entity_f1

        loss, labels, preds = self.predict(model, precision, split, max_batches)
        true_tags, pred_tags = aligned_tags(labels, preds, self.id2label)
        keep = labels != IGNORE_INDEX
        accuracy = _accuracy(labels[keep], preds[keep], loss)
        f1 = entity_f1(true_tags, pred_tags)
        # no score where there is nothing to score: no entity to find (only O tags) and none
        # predicted, where 0.0 read as a miss; entities predicted where there are none score
        # 0.0 (precision 0), and a NaN loss keeps NaN, as accuracy (no real predictions)
        entity = f1["f1"] if f1["true"] or f1["pred"] else None
        if math.isnan(loss):
            entity = math.nan
        metrics = {"loss": loss, "accuracy": accuracy, "entity_f1": entity}
        return metrics, true_tags, pred_tags, f1

    def evaluate(self, model, precision, split="validation", max_batches=None):
        limit = self.config.eval_batches if max_batches is None else max_batches
        return self._scores(model, precision, split, limit)[0]

    def report(self, model, precision, split, max_batches=None):
        from lowbit.data import entity_spans, token_report
        from lowbit.data.label_report import UNSCORED, UNSCORED_NOTE, f1_rows

        metrics, true_tags, pred_tags, f1 = self._scores(model, precision, split, max_batches)
        text, per_label = token_report(true_tags, pred_tags, self.labels)
        lines = [_metrics_line(metrics), "", "per-label (token level):", text, "entity level:"]
        # every entity type of the run's tags has a row, as every tag has above: a type that the
        # sentences evaluated neither hold nor predict has no score, and counts 0 true entities
        kinds = {kind for tag in self.labels for kind, _, _ in entity_spans([tag])}
        unscored = dict.fromkeys(("precision", "recall", "f1")) | {"true": 0}
        per_type = {k: f1["per_type"].get(k, unscored) for k in sorted(kinds | set(f1["per_type"]))}
        # as wide as the longest type (BioNLP's Gene_or_gene_product), so the columns stay in line
        width = max([12, *(len(kind) + 2 for kind in per_type)])
        lines.append(f"{'type':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'true':>8}")
        # ALL: as the metric, no score where no entity is true or predicted (it printed 0.0000)
        overall = unscored if metrics["entity_f1"] is None else f1
        for kind, s in [*per_type.items(), ("ALL", overall)]:
            cells = [
                UNSCORED if s[k] is None else f"{s[k]:.4f}" for k in ("precision", "recall", "f1")
            ]
            row = f"{kind:<{width}}" + "".join(f"{c:>10}" for c in cells) + f"{s['true']:>8}"
            lines.append(row)
        if unscored in [*per_type.values(), overall]:
            lines.append(UNSCORED_NOTE)
        # the tables' numbers for `lowbit eval --json`, from the same pass (every tag is a label):
        # the entity table's rows in the per-label rows' shape, its ALL row being ``entity_f1``
        per_label_f1 = f1_rows(per_label, sorted(self.label2id))
        per_entity_f1 = {k: {"this": s["f1"], "support": s["true"]} for k, s in per_type.items()}
        out = {**metrics, "per_label_f1": per_label_f1, "per_entity_f1": per_entity_f1}
        return out, "\n".join(lines)


@functools.lru_cache(maxsize=2)
def _syntax_tags(seq_len: int, model: str | None = None) -> tuple[dict, object]:
    """The built-in task's sentences, each filling at most ``seq_len`` positions with its special
    tokens: ``seq_len - 2`` words for a fresh encoder, as many word pieces of the pretrained
    ``model``'s tokenizer (a few seconds of parsing; cached, treated as read-only); and that
    tokenizer (None for a fresh encoder), which the task encodes them with: the task loaded it a
    second time (~40 ms of CPU for MiniLM's, and a second serialization for the word-pieces
    cache's key). Its calls set their own truncation and padding, so runs may share it."""
    from lowbit.data import syntax_tag_task
    from lowbit.data.syntax_tags import piece_counts
    from lowbit.models import load_encoder_tokenizer

    if model is None:
        return syntax_tag_task(window=seq_len - 2), None
    tokenizer = load_encoder_tokenizer(model)
    window = seq_len - tokenizer.num_special_tokens_to_add()
    return syntax_tag_task(window=window, piece_counter=piece_counts(tokenizer)), tokenizer


LABELS_FILE = "labels.json"  # a token-classification run's tags, in the order of its outputs


def _saved_labels(run_dir) -> list[str] | None:
    """The tags a run trained with, in the order of its outputs (its labels.json); None for no
    run, or one written before runs saved them."""
    path = Path(run_dir) / LABELS_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _check_run_labels(run_dir, found: list[str]) -> None:
    """Refuse data whose tags ``found`` are not all among those the run trained with (its
    labels.json), where it has them. The model has one output per tag in that order: reading
    them again from data that has gained a tag since would shift the ids of the others."""
    saved = _saved_labels(run_dir)
    if saved is None:
        return
    unknown = [label for label in found if label not in saved]
    if unknown:
        raise UsageError(
            f"{run_dir}: the data has tags the run did not train with ({', '.join(unknown[:5])}); "
            f"fix: use data tagged with the run's tags ({', '.join(saved)})"
        )


def _cut_sentences(sentences, labels: torch.Tensor) -> int:
    """How many ``sentences`` lose words to the sequence length: fewer of their words have a
    label (a first piece kept) than they hold."""
    if not len(sentences):
        return 0
    words = torch.tensor([len(sentence.tokens) for sentence in sentences], dtype=torch.long)
    return int(((labels != IGNORE_INDEX).sum(1) < words).sum())


def _warn_truncated(
    sentences: str,
    cut: int,
    total: int,
    seq_len: int,
    positions: int | None,
    run: bool,
    left_out: str,
) -> None:
    """Say that ``cut`` of the ``total`` ``sentences`` ("test sentences", "sentences of new.txt")
    lose words to the sequence length, words ``left_out`` of "training" (a new run's train split)
    or of "the metrics" (a split evaluated, the train split too under `lowbit eval --split
    train`), which then cover part of the split. ``run``: the task is built for a run that
    exists (resumed, evaluated): its --seq-len is fixed, so the fix is a new run (`lowbit eval`
    said "fix: raise --seq-len", a training option). Where --seq-len is already the encoder's
    ``positions``, the fix is shorter sentences: "raise --seq-len" was refused next ("exceeds
    the encoder's 512 positions")."""
    shorter = "split such sentences into shorter ones (a blank line between the parts)"
    longer = "--seq-len" if positions is None else f"--seq-len (up to the encoder's {positions})"
    fix = f"train a run with a longer {longer}, or {shorter}" if run else f"raise {longer}"
    if positions is not None and seq_len >= positions:
        fix = f"{shorter}: --seq-len {seq_len} is the most the encoder's {positions} positions hold"
    whose = "the run's " if run else ""
    warn_once(
        f"{cut} of {total} {sentences} are longer than {whose}--seq-len "
        f"{seq_len} holds; their words past it are left out of {left_out}; fix: {fix}"
    )


def _warn_untrained_tags(source: str, trained: set[str], named: dict) -> list[str]:
    """Say which tags occur in the sentences of ``named`` (``{"the validation split": [...]}``)
    and not in ``trained``: the model gets an output for each that no training word teaches (or,
    evaluated on new data, none), so their words are mostly mispredicted and their entities
    count as missed in entity F1 (a typo, ``B-LCO``, or a type the training file lacks). Returns
    those tags, of every part."""
    every: list[str] = []
    for where, sentences in named.items():
        extra = sorted({t for s in sentences for t in s.tags} - trained)
        every += [tag for tag in extra if tag not in every]
        if extra:
            several = len(extra) > 1
            shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
            warn_once(
                f"{source}: {len(extra)} {'tags' if several else 'tag'} of "
                f"{where} never {'occur' if several else 'occurs'} in training ({shown}): "
                f"the model cannot learn {'them and their' if several else 'it and its'} words "
                "count as errors; fix: correct the tags if mistyped, else add training sentences "
                f"that hold {'them' if several else 'it'}"
            )
    return every


def _warn_other_scheme(source: str, sentences: dict, splits) -> None:
    """Say where a split of ``splits`` opens its entities otherwise than training does
    (`lowbit.data.conll.iob_scheme`: IOB1's ``I-`` against IOB2's ``B-``): entity F1 reads both
    alike, but the model tags each entity's first word as training did, which token accuracy and
    the per-label table count as wrong (MiniLM, 20 fp32 steps on IOB2 train and IOB1 dev files:
    entity F1 0.9524, token accuracy 0.5733)."""
    from lowbit.data.conll import iob_scheme

    opens = {"IOB1": "I-", "IOB2": "B-"}
    trained = iob_scheme(sentences["train"])
    other = {"IOB1": "IOB2", "IOB2": "IOB1"}.get(trained)
    splits = [s for s in splits if iob_scheme(sentences.get(s, [])) == other]
    if other and splits:
        warn_once(
            f"{source}: the {' and '.join(splits)} split"
            f"{'s open their' if len(splits) > 1 else ' opens its'} entities with {opens[other]} "
            f"({other}), the train split with {opens[trained]} ({trained}): the model learns to "
            f"tag an entity's first word {opens[trained]}, which token accuracy and the "
            "per-label table count as wrong there (entity F1 reads both alike); fix: write every "
            "split in one scheme, e.g. IOB2 (B- on each entity's first word)"
        )


def _warn_left_context(name: str, model, seq_len: int) -> None:
    """Say that the pretrained ``model`` (the --model ``name``) is a decoder, whose positions see
    only the words before them (`sees_left_context_only`): a tag that the words after decide (an
    entity's type, told by what follows its name) is guessed from its left alone, which an
    encoder, seeing both sides, does not. Probed at the run's ``seq_len`` (which the model was
    checked to hold), at most 16 tokens: a short forward pass, long enough for Funnel's pooling."""
    from lowbit.models.token_classifier import sees_left_context_only

    if sees_left_context_only(model, min(seq_len, 16)):
        warn_once(
            f"{name}: a decoder ({model.config.model_type!r}, causal attention): "
            "each word is tagged from the words before it alone, never those after, which costs "
            "accuracy where the words after decide a tag (named entities); fix: fine-tune an "
            "encoder that reads both sides, --model minilm or a BERT-style folder"
        )


def _encode_pretrained(tokenizer, sentences, label2id, config):
    from lowbit.data import encode_with_tokenizer

    return encode_with_tokenizer(tokenizer, sentences, label2id, config.seq_len)


def _sentences_fingerprint(source, splits) -> dict:
    from lowbit.data import Document, fingerprint

    out = {}
    for split, sentences in splits.items():
        docs = [
            Document(f"{i}", "\n".join(f"{w} {t}" for w, t in zip(s.tokens, s.tags)))
            for i, s in enumerate(sentences)
        ]
        out[split] = fingerprint(docs)
    out["source"] = str(source)
    return out


# ---------------------------------------------------------------------------- image classification


def as_param_dtype(images: torch.Tensor, model) -> torch.Tensor:
    """Pixels in the dtype of the parameters (bf16 under pure-bf16 recipes), as a pure run feeds them."""
    return images.to(next(model.parameters()).dtype)


NON_FINITE_NOTE = (
    "(the model's output holds NaN or inf: the metrics above are NaN, and the tables below count "
    "its argmax, the first class of a NaN row; fix: evaluate an earlier checkpoint)"
)


def _metrics_line(metrics: dict) -> str:
    """A classifier's metrics line, and `NON_FINITE_NOTE` under it where its loss is NaN."""
    note = f"\n{NON_FINITE_NOTE}" if math.isnan(metrics["loss"]) else ""
    return format_metrics(metrics) + note


def _accuracy(labels: torch.Tensor, preds: torch.Tensor, loss: float = 0.0) -> float:
    """The fraction of correct predictions, divided in float64: a float32 mean printed 51 of 270
    as 0.18888889253139496 (``lowbit eval --json``, results.json) where 51/270 is 0.1888...89.
    NaN for no predictions, as the mean of none, and where the summed ``loss`` is NaN: some
    output was NaN or inf (a diverged or overflowing model), whose argmax is the first class of a
    NaN row, not a prediction: a tagger gone NaN scored the share of its "O" words as accuracy."""
    if not len(labels) or math.isnan(loss):
        return math.nan
    return (labels == preds).sum().item() / len(labels)


class ImageClassificationTask(Task):
    """scikit-learn's 8x8 digits with a small CNN."""

    unit = "img"

    def __init__(self, config, run_dir=None):
        from lowbit.data import NUM_CLASSES, TensorBatches, load_digit_splits
        from lowbit.models import build_cnn

        super().__init__(config)
        self.splits = load_digit_splits(seed=0)  # a fixed split: runs with any seed compare
        self.fingerprint = {
            "source": "sklearn digits",
            **{k: {"images": len(v[1])} for k, v in self.splits.items()},
        }
        self.model = build_cnn(config.model, num_classes=NUM_CLASSES, seed=config.seed)
        self.train_batches = TensorBatches(
            self.splits["train"], config.batch_size, config.seed, config.grad_accum
        )

    def steps_per_epoch(self) -> int:
        return self.train_batches.steps_per_epoch // self.config.grad_accum  # whole steps

    def eval_rows(self, split: str) -> int:
        return len(self.splits[split][1])

    def loss(self, model, batch):
        images, labels = batch
        return F.cross_entropy(model(as_param_dtype(images, model)).float(), labels), len(labels)

    def predict(self, model, precision, split, max_batches=None):
        from lowbit.data import fixed_batches

        batches = fixed_batches(self.splits[split], self.config.batch_size)
        if max_batches:
            batches = batches[:max_batches]
        device = next(model.parameters()).device
        total, labels_all, preds_all = 0.0, [], []
        with evaluating(model, precision):
            for batch in batches:
                images, labels = to_device(batch, device)
                logits = model(as_param_dtype(images, model)).float()
                total += F.cross_entropy(logits, labels, reduction="sum").item()
                labels_all.append(labels.cpu())
                preds_all.append(logits.argmax(-1).cpu())
        labels, preds = torch.cat(labels_all), torch.cat(preds_all)
        return total / len(labels), labels, preds

    def evaluate(self, model, precision, split="validation", max_batches=None):
        if max_batches is None:  # the trainer's validation, which other tasks bound by the config
            self._warn_eval_batches_ignored(split)
        loss, labels, preds = self.predict(model, precision, split, max_batches)
        return {"loss": loss, "accuracy": _accuracy(labels, preds, loss)}

    def _warn_eval_batches_ignored(self, split: str) -> None:
        """Say, once a process, that a given --eval-batches too few for the split does not bound
        this task's validation: it evaluates every image (270, a few batches), the numbers that
        recorded runs and studies compare. Unsaid, a user believed the bound took effect."""
        from lowbit.train.config import TrainConfig

        given, size = self.config.eval_batches, self.config.batch_size
        images = len(self.splits[split][1])
        if given == TrainConfig.eval_batches or given * size >= images:
            return
        line = (
            f"eval_batches (--eval-batches) {given} does not apply to task image-classification, "
            f"which evaluates its whole {split} split ({images} images, "
            f"{math.ceil(images / size)} batches of {size}); ignored"
        )
        warn_once(line)  # compare trains many runs of one setting

    def report(self, model, precision, split, max_batches=None):
        from lowbit.data import NUM_CLASSES
        from lowbit.data.label_report import f1_rows, label_report

        loss, labels, preds = self.predict(model, precision, split, max_batches)
        metrics = {"loss": loss, "accuracy": _accuracy(labels, preds, loss)}
        # every digit has a row, one that a subset (--max-batches) lacks too
        digits = list(range(NUM_CLASSES))
        text, per_label = label_report(labels.tolist(), preds.tolist(), digits)
        text = f"{_metrics_line(metrics)}\n\nper-label:\n{text}"
        # the table's numbers for `lowbit eval --json`, from the same pass
        return {**metrics, "per_label_f1": f1_rows(per_label, digits)}, text
