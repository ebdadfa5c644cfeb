"""Models for lowbit's tasks: Llama-style causal LMs, BERT-style token classifiers, a digits CNN.

`build_model(task, size_or_path, **kw)` is the one entry point the trainer needs; a named size
builds a fresh model, a folder loads a local Hugging Face checkpoint.
"""

from __future__ import annotations

from lowbit.errors import choose
from lowbit.models import causal_lm
from lowbit.models.causal_lm import (
    build_causal_lm,
    check_seq_len,
    list_sizes,
    load_causal_lm,
    max_positions,
    model_config,
)
from lowbit.models.cnn import DigitsCNN, build_cnn
from lowbit.models.token_classifier import (
    build_token_classifier,
    find_minilm,
    load_encoder_tokenizer,
)

TASKS = ("causal-lm", "token-classification", "image-classification")


def build_model(task: str, size_or_path: str, **kw):
    """Dispatch on ``task``:

    - ``causal-lm``: a named size -> `build_causal_lm(size, vocab_size, max_seq_len, seed)`,
      otherwise a checkpoint folder -> `load_causal_lm(path, max_seq_len, seed)` (the seed
      initializes a folder that holds only a config);
    - ``token-classification``: `build_token_classifier(size_or_path, labels, vocab_size, seed,
      max_seq_len)`;
    - ``image-classification``: `build_cnn(size, num_classes, seed)`.
    """
    choose("task", task, TASKS)
    if task == "causal-lm":
        if size_or_path in causal_lm.SIZES:
            return build_causal_lm(size_or_path, **kw)
        kw.pop("vocab_size", None)  # a checkpoint brings its own vocabulary
        return load_causal_lm(size_or_path, **kw)
    if task == "token-classification":
        return build_token_classifier(size_or_path, **kw)
    return build_cnn(size_or_path, **kw)


__all__ = [
    "TASKS",
    "DigitsCNN",
    "build_causal_lm",
    "build_cnn",
    "build_model",
    "build_token_classifier",
    "check_seq_len",
    "find_minilm",
    "list_sizes",
    "load_causal_lm",
    "load_encoder_tokenizer",
    "max_positions",
    "model_config",
]
