"""Llama-style decoder-only language models (Hugging Face ``LlamaForCausalLM``).

Llama's architecture: RMSNorm, rotary position embeddings, SwiGLU MLP, no biases. Sizes are rows of
`SIZES` (data, not code), smallest first. ``nano`` / ``tiny`` / ``small`` / ``medium`` are lowbit's
own shapes for the byte tokenizer (about 0.18M / 0.9M / 11M / 40M parameters with vocab 257) and
train on a CPU (``nano`` is the parity study's: small enough to see millions of tokens per run on
one core); the others are published shapes, used by the memory estimator and not meant to be
instantiated on a CPU:

- ``gpt2-124m``: GPT-2 small's width, depth, heads and 1024 positions, with a SwiGLU MLP of 2048
  (three matrices of 2048 hold as many weights as GPT-2's two 4x GELU matrices) and tied
  embeddings, so it has GPT-2's 124M parameters;
- ``llama-1b``: Llama 3.2 1B (grouped-query attention, tied embeddings; the llama3 rope scaling
  for long context is left out: it changes no shape);
- ``llama-7b`` / ``llama-13b`` / ``llama-70b``: Llama 2.

Input and output embeddings are untied unless the published model ties them: untied matrices
let a precision recipe treat the LM head separately from the embedding lookup.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lowbit.errors import UsageError, choose, note_later
from lowbit.models.pretrained import (
    GONE,
    check_export_keys,
    from_pretrained,
    has_weights,
    is_export,
    load_config,
    run_as_model,
)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # HF class names of decoder LMs (GPT2LMHeadModel)


def is_causal_lm(architectures: list[str], model_type: str | None = None) -> bool:
    """Whether a checkpoint's ``architectures`` (config.json) name a causal-LM class: by its
    name's suffix, or as the class transformers' ``AutoModelForCausalLM`` builds for
    ``model_type`` (Gemma 3's is ``Gemma3ForConditionalGeneration``, which generates text from
    text alone too: published Gemma 3 checkpoints name only it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return any(name.endswith(_CAUSAL_SUFFIXES) or name == causal for name in architectures)


_COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

SIZES: dict[str, dict] = {
    "nano": {
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 176,
        "max_position_embeddings": 1024,
        "vocab_size": 257,
    },
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 344,
        "max_position_embeddings": 1024,
        "vocab_size": 257,
    },
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "intermediate_size": 1024,
        "max_position_embeddings": 1024,
        "vocab_size": 257,
    },
    "medium": {
        "hidden_size": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "intermediate_size": 1376,
        "max_position_embeddings": 1024,
        "vocab_size": 257,
    },
    "gpt2-124m": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 2048,
        "max_position_embeddings": 1024,
        "vocab_size": 50257,
        "tie_word_embeddings": True,
    },
    "llama-1b": {  # Llama 3.2 1B config.json
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
    "llama-7b": {  # Llama 2 7B config.json
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "vocab_size": 32000,
    },
    "llama-13b": {  # Llama 2 13B config.json
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "intermediate_size": 13824,
        "max_position_embeddings": 4096,
        "vocab_size": 32000,
    },
    "llama-70b": {  # Llama 2 70B config.json
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
        "max_position_embeddings": 4096,
        "vocab_size": 32000,
    },
}


def list_sizes() -> list[str]:
    """The named sizes, smallest first."""
    return list(SIZES)


def model_config(size: str, vocab_size: int | None = None):
    """The ``LlamaConfig`` of a named size, with its default vocab unless ``vocab_size`` is given."""
    from transformers import LlamaConfig

    choose("model size", size, SIZES)
    fields = {**_COMMON, **SIZES[size]}
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    return LlamaConfig(**fields)


# Config fields that bound a decoder's sequence length. transformers maps most families' own
# names to ``max_position_embeddings`` (GPT-2's n_positions); MPT's ``max_seq_len`` (the rows of its
# ALiBi bias, which a longer sequence does not broadcast with) has no such mapping.
POSITION_FIELDS = ("max_position_embeddings", "max_seq_len")


def text_config(config):
    """The config of a model's text decoder: ``config`` itself, or a multimodal model's text
    config (Gemma 3's ``text_config``), which holds the vocabulary and position fields."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_positions(config) -> int | None:
    """The longest sequence a model config allows (`POSITION_FIELDS`); None for models without
    a limit (ALiBi's BLOOM: its attention bias extends to any length). A multimodal config
    (Gemma 3's) holds the limit in its text config."""
    config = text_config(config)
    for field in POSITION_FIELDS:
        positions = getattr(config, field, None)
        if positions is not None:
            return int(positions)
    return None


def max_positions(model) -> int | None:
    """The longest sequence the model takes (`config_positions` of its config)."""
    return config_positions(model.config)


def model_positions(model: str) -> int | None:
    """`config_positions` of a --model: a named size's row (importing transformers for its
    LlamaConfig, ~2 s of CPU, is no part of a check in a process that builds no model: `lowbit
    compare --jobs`'s), or a checkpoint folder's config (`folder_config`)."""
    if model in SIZES:
        return SIZES[model]["max_position_embeddings"]
    return config_positions(folder_config(model))


def default_seq_len(default: int, positions: int | None, flag: str) -> int:
    """The sequence length of a run (or estimate) given none: ``default``, or the model's
    ``positions`` where it takes fewer, said in a note naming ``flag``. A small --model folder
    (64 positions) was refused "sequence length 256 exceeds the model's 64 positions" (1024 by
    `lowbit estimate`), of a length the user never gave; one given above the limit still is.
    The note is held (`note_later`) until the command is past its refusals: a run refused for
    its folder's weights prints its error alone."""
    if positions is None or default <= positions:
        return default
    note_later(
        f"no {flag} given: {positions}, the most the model's {positions} positions take "
        f"(the default is {default})"
    )
    return positions


def check_seq_len(model, seq_len: int) -> None:
    """Raise a `UsageError` when ``seq_len`` exceeds the model's maximum positions."""
    check_positions(max_positions(model), seq_len)


def check_positions(positions: int | None, seq_len: int) -> None:
    """`check_seq_len` against a model's ``positions`` (`config_positions`; None: no limit),
    without building the model (the `--nproc` launcher's check before its ranks each build it)."""
    if positions is not None and seq_len > positions:
        raise UsageError(
            f"sequence length {seq_len} exceeds the model's {positions} positions; "
            f"fix: --seq-len {positions} or less, or a model with more positions"
        )


def build_causal_lm(size: str, vocab_size: int, max_seq_len: int | None = None, seed: int = 0):
    """A freshly initialized model of a named size; the init depends only on ``seed``.

    The global torch RNG is left untouched. ``max_seq_len`` is checked against the size's positions.
    """
    from transformers import LlamaForCausalLM

    config = model_config(size, vocab_size)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if max_seq_len is not None:
        check_seq_len(model, max_seq_len)
    return model


def not_causal(path, config, folder: Path) -> UsageError:
    """Why a checkpoint (or config) is no causal LM. Where its ``architectures`` name another head
    (or none) of a model type that has a causal-LM class, "use a decoder such as Llama" contradicted
    a Llama config: the message names the head, and the fix the class to ask for (written into a
    config by itself, it builds a fresh model with that head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = config.architectures or []
    refused = (
        f"{path}: a {config.model_type!r} checkpoint ({', '.join(architectures) or 'no head'}) "
        "is not a causal language model"
    )
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    # an encoder's own task here: `lowbit estimate` said so, `lowbit train` did not (session 41)
    tagger = ", or --task token-classification for an encoder" if _is_encoder(config) else ""
    if causal is None or not architectures or is_causal_lm(architectures, config.model_type):
        return UsageError(
            f"{refused}; fix: use a decoder checkpoint such as Llama or GPT-2{tagger}"
        )
    _, _, head = architectures[0].partition("For")  # LlamaForSequenceClassification
    head = re.sub(r"(?<=[a-z])(?=[A-Z])", "-", head).lower()  # sequence-classification
    what = f"a {head} head" if head else "the base model without a head"
    if folder.is_dir() and has_weights(folder):
        fix = f"a checkpoint with a causal-LM head ({causal})"
    else:
        fix = f'set "architectures": ["{causal}"] in the config.json for a fresh causal LM'
    return UsageError(f"{refused}: its config names {what}; fix: {fix}{tagger}")


def _is_encoder(config) -> bool:
    """Whether ``config``'s model type is an encoder that `lowbit train --task
    token-classification` trains: transformers builds a masked-LM and a token-classification
    model of it (BERT, RoBERTa, DeBERTa; not Llama, which has no masked LM)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    )

    kind = config.model_type
    return kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and kind in (
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES
    )


def _as_decoder(config) -> dict:
    """The config fields that make an encoder's causal-LM class causal, where the config leaves
    them unset: ``is_decoder`` (BERT's BertLMHeadModel, RoBERTa's, ELECTRA's, ...) and XLM's
    ``causal``. Without them it attends both ways, which transformers only logs; trained so,
    each position saw the token it was to predict and the loss fell without the model learning
    to predict anything. Decoders whose config has no such field (Llama, GPT-2) are built as
    they are."""
    return {
        field: True for field in ("is_decoder", "causal") if getattr(config, field, None) is False
    }


def decoder_fields(path) -> list[str]:
    """The fields `load_causal_lm` sets to build the --model folder (or config.json) ``path`` as a
    decoder (`_as_decoder`): a run records them, as runs trained before lowbit did so attended
    both ways, and their weights do not fit the causal model built now
    (`lowbit.train.checkpoint.check_model_folder`). Empty where the config cannot be read: the
    load that reads it names the problem."""
    try:
        return sorted(_as_decoder(load_config(Path(path))))
    except (OSError, UsageError):
        return []


def folder_config(path):
    """The config of the --model folder (or config.json) ``path`` that `load_causal_lm` builds,
    read without its weights; a `UsageError` where ``path`` is no checkpoint folder or its
    config.json cannot be read. The `--nproc` launcher checks a folder with it before it starts
    the ranks, which each build the model."""
    folder = Path(path)
    config_file = folder.is_file() and folder.suffix == ".json"  # a config.json by itself
    if not (config_file or (folder / "config.json").is_file()):
        if (refusal := run_as_model(path)) is not None:  # a run, a checkpoint, checkpoints/, ...
            raise refusal
        what = "not a Hugging Face checkpoint folder (no config.json)"
        if not folder.exists():  # a typo, or the folder a run was fine-tuned from, moved since
            what += f", nor a size ({GONE})"
        raise UsageError(
            f"{path}: {what}; fix: give a named size ({', '.join(SIZES)}), a folder written by "
            "save_pretrained or a config.json"
        )
    return load_config(folder)


def _from_folder(auto_class, folder: Path, fields: dict):
    """`from_pretrained`; a `lowbit export` folder's weights must all fit its config
    (`check_export_keys`)."""
    if not is_export(folder):
        return from_pretrained(auto_class, folder, **fields)
    model, info = from_pretrained(auto_class, folder, loading_info=True, **fields)
    check_export_keys(folder, info)
    return model


def load_causal_lm(path, max_seq_len: int | None = None, seed: int = 0):
    """A causal LM from a local Hugging Face checkpoint folder (``save_pretrained`` output); from
    a folder with only a ``config.json`` (or a config.json file), a fresh model of that config
    initialized from ``seed`` (the global torch RNG is left untouched)."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    config = folder_config(path)
    architectures = config.architectures or []
    model = None
    if not architectures or is_causal_lm(architectures, config.model_type):
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = _from_folder(AutoModelForCausalLM, folder, _as_decoder(config))
        except UsageError:  # a ValueError too: an unreadable weights file, named
            raise
        except ValueError:  # no causal-LM class for this model type
            model = None
    if model is None:
        raise not_causal(path, config, folder)
    if max_seq_len is not None:
        check_seq_len(model, max_seq_len)
    return model
