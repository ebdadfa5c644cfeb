"""Data for lowbit's tasks: corpora and their fixed splits, tokenizers, causal-LM batches, the
built-in syntax-tagging task, CoNLL/IOB files and entity F1, and scikit-learn's digits."""

from lowbit.data.batches import TensorBatches, fixed_batches
from lowbit.data.conll import (
    Sentence,
    aligned_tags,
    entity_f1,
    entity_spans,
    read_conll,
    read_conll_documents,
    token_report,
)
from lowbit.data.corpus import (
    SPLITS,
    Corpus,
    Document,
    fingerprint,
    load_corpus,
    load_texts,
    split_documents,
    split_of,
    stdlib_documents,
)
from lowbit.data.digits import NUM_CLASSES, load_digit_splits
from lowbit.data.lm_dataset import LMBatches, eval_batches, tokenize_split
from lowbit.data.syntax_tags import (
    IGNORE_INDEX,
    LABELS,
    WordVocab,
    encode_with_tokenizer,
    syntax_tag_task,
    tag_source,
)
from lowbit.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "IGNORE_INDEX",
    "LABELS",
    "NUM_CLASSES",
    "SPLITS",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "Document",
    "LMBatches",
    "Sentence",
    "TensorBatches",
    "WordVocab",
    "aligned_tags",
    "build_tokenizer",
    "encode_with_tokenizer",
    "entity_f1",
    "entity_spans",
    "eval_batches",
    "fingerprint",
    "fixed_batches",
    "load_corpus",
    "load_digit_splits",
    "load_texts",
    "load_tokenizer",
    "read_conll",
    "read_conll_documents",
    "split_documents",
    "split_of",
    "stdlib_documents",
    "syntax_tag_task",
    "tag_source",
    "token_report",
    "tokenize_split",
    "train_bpe",
]
