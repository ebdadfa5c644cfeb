"""Loading local Hugging Face checkpoint folders (never downloading).

A folder that holds a ``config.json`` but no weights (a model described by its config only, as
one writes for a small experiment), or the path of such a config.json itself, gives a freshly
initialized model of that architecture, drawn from the caller's torch RNG (a new run refuses a
`lowbit export` folder that lost its weights: `check_export_weights`).

`load_config` reads the config first, so that a config.json transformers cannot use is a one-line
`UsageError` naming the problem, not a traceback from deep inside transformers.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import shlex
from pathlib import Path

import torch

from lowbit.errors import UsageError, a_task_run
from lowbit.models.torch_file import torch_file_problem

# Said of a --model path where nothing is: a run trained from a folder reads it again when it is
# evaluated, quantized or resumed, so a folder moved since looks like a typo.
GONE = "nothing is at that path; a run trained from a folder needs it where it was"


def run_folder_above(given: Path) -> Path | None:
    """The lowbit run folder that the existing ``given`` lies in, within three levels (a
    checkpoint, a ``.dcp`` checkpoint's files, ``checkpoints/``, ``config.yaml``), as the path
    given names it where it does, else absolute; None where there is none. Such a path given as a
    --model is no model: `lowbit estimate` names the run folder it takes instead, `lowbit train`
    the way to train from a run's weights (`lowbit.models.causal_lm.folder_config`)."""
    from lowbit.train.config import is_run_folder

    given = Path(given)
    if not given.exists():
        return None
    for parents in (given.parents, given.absolute().parents):
        found = next((p for p in list(parents)[:3] if is_run_folder(p)), None)
        if found is not None:
            return found
    return None


def run_as_model(path, task: str = "causal-lm") -> UsageError | None:
    """The refusal of ``path`` as the --model of `lowbit train --task task` where it holds no
    config.json but is a lowbit run folder, a quantized or pruned one (a config.yaml), or a path
    inside one (`run_folder_above`): not a model, and the ways to train from it that work: `lowbit
    export` of a causal-lm run (its last checkpoint) to train from, --resume of a run of ``task``
    (a quantized or pruned folder has no run to resume). None where it is none of those."""
    from lowbit.infer.io import is_inference_dir
    from lowbit.train.config import read

    folder = Path(path)
    here = (folder / "config.yaml").is_file()
    run = folder if here else run_folder_above(folder)
    if run is None:
        return None
    try:
        run_task = read(run).task
    except UsageError:  # an unreadable config.yaml: its own error comes with the run's next use
        run_task = None
    inference = is_inference_dir(run)
    fixes = []
    if run_task in (None, "causal-lm"):  # `lowbit export` refuses the other tasks' runs
        export = f"lowbit export {shlex.quote(str(run))} --out DIR"
        fixes.append(
            f"lowbit export it ({export}) and train with --model DIR"
            if here
            else f"{export}{'' if inference else ' (its last checkpoint)'} and train with --model DIR"
        )
    if not inference and run_task in (None, task):
        fixes.append("--resume the run" if here else f"--resume {shlex.quote(str(run))}")
    if not fixes:
        fixes.append(
            f"give a Hugging Face model folder ({a_task_run(run_task)} is no model to start "
            "from: lowbit export takes causal-lm runs)"
        )
    what = (
        "not a Hugging Face checkpoint folder (no config.json) but a lowbit run or "
        "quantized/pruned one"
        if here
        else f"inside the lowbit run folder {run}, not a model"
    )
    return UsageError(f"{path}: {what}; fix: {', or '.join(fixes)}")


def with_sdpa(build):
    """``build(attn_implementation="sdpa")``: the model with PyTorch's SDPA attention, or with its
    own (eager) attention, ``build()``, for architectures that have no SDPA version (BLOOM)."""
    try:
        return build(attn_implementation="sdpa")
    except ValueError as error:
        if "scaled_dot_product_attention" not in str(error):
            raise
    return build()


# What building a model of a config with inconsistent fields raises in transformers' code: a
# RuntimeError for a size that makes no tensor (a negative hidden_size), ZeroDivisionError for a
# head_dim of 0, assertions and lookups of fields that do not fit together.
BUILD_ERRORS = (AssertionError, TypeError, KeyError, IndexError, RuntimeError, ZeroDivisionError)


# What `save_pretrained` writes for the weights (one file, or an index of shards).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# Architectures whose transformers forward fails under autocast. DeBERTa (v1): its attention fills
# the masked scores with the minimum of the query's dtype, which is fp32 under autocast (the fp32
# ``q_bias`` added to the projection promotes it) while the scores are autocast's 16 bits, so the
# first forward stops with "value cannot be converted to type c10::BFloat16 without overflow"
# (huggingface/transformers#35332), as under plain torch.autocast. DeBERTa-v2/v3 train.
NO_AUTOCAST = {"deberta": "DeBERTa (v1)"}


def check_autocast(model, autocast_dtype: torch.dtype | None, recipe: str) -> None:
    """A `UsageError` when ``recipe`` runs the forward of ``model`` under autocast to
    ``autocast_dtype`` (None: no autocast) and its architecture cannot take it (`NO_AUTOCAST`).
    `lowbit.Precision.convert` checks it, so the trainer and users' own loops refuse alike."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_autocast_for(model_type, autocast_dtype, recipe)


def check_autocast_for(
    model_type: str | None, autocast_dtype: torch.dtype | None, recipe: str
) -> None:
    """`check_autocast` for a model known by its config's ``model_type``: a compare study checks
    every recipe before its first run builds the model (`model_type_of`)."""
    family = NO_AUTOCAST.get(model_type)
    if autocast_dtype is not None and family is not None:
        raise UsageError(
            f"recipe {recipe} runs under {str(autocast_dtype).removeprefix('torch.')} autocast, "
            f"where transformers' {family} attention overflows 16 bits; fix: a recipe without "
            "autocast (fp32, bf16-low, bf16-pure, fp16-low) or a DeBERTa-v2/v3 model"
        )


def model_type_of(path) -> str | None:
    """The ``model_type`` a --model folder's config.json (or that file) names, read without
    transformers; None for a named model (a size, ``minilm``) or a config that cannot be read,
    which the run building the model reports."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no such file, a folder without one, not JSON or not UTF-8
        return None
    kind = fields.get("model_type") if isinstance(fields, dict) else None
    return kind if isinstance(kind, str) else None


def has_weights(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in WEIGHT_FILES)


def weight_files(folder: Path, single: str) -> list[Path]:
    """The files transformers reads for the weights named ``single`` (``model.safetensors`` or
    ``pytorch_model.bin``): that file, or the shards its ``.index.json`` lists (none where the
    index cannot be read: transformers names the index itself). A shard the index lists that is
    not there is a `UsageError` naming it: transformers' error for it is a traceback."""
    if (folder / single).is_file():
        return [folder / single]
    index = folder / f"{single}.index.json"
    if not index.is_file():
        return []
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    files = [folder / name for name in sorted(set(shards))]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise UsageError(
            f"{index} lists {len(missing)} shard(s) that are not in the folder "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); fix: copy them "
            "too, or write the folder again with save_pretrained"
        )
    return files


def _unreadable(file: Path, why: str) -> UsageError:
    return UsageError(
        f"{file}: unreadable weights ({' '.join(why.split())}); fix: copy it again, or write the "
        "folder again with save_pretrained"
    )


def check_safetensors(folder: Path) -> None:
    """A `UsageError` naming the first safetensors file of ``folder`` that transformers would
    read (``model.safetensors`` or the shards its index lists) and whose header does not parse: a
    truncated or torn file (an interrupted copy or download), which transformers reports as a
    traceback naming no file. The header records every tensor's byte range, so reading it checks
    that the file is whole without reading the weights."""
    from safetensors import safe_open

    for file in weight_files(Path(folder), "model.safetensors"):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as error:  # safetensors' own error type: a bad header, a short file
            raise _unreadable(file, str(error)) from None


def check_pytorch_bin(folder: Path) -> None:
    """`check_safetensors` for a folder whose weights are ``pytorch_model.bin`` (or its shards),
    which transformers reads only where there is no safetensors file: torch.save writes a zip
    archive, whose directory at the end of the file is gone when the file is cut short, and
    torch's reader reports that as a traceback ("Invalid argument") naming no file. Reading the
    directory checks the file without reading the weights; a file of no format or pickle protocol
    transformers' safe load reads is named as `lowbit formats --tensor` names it
    (`torch_file_problem`). A file of torch's legacy format (a pickle, before PyTorch 1.6) has no
    directory: it is loaded onto the meta device, which reads it through and fails on a file cut
    short ("unexpected EOF") but keeps no weight in memory."""
    folder = Path(folder)
    safetensors = ("model.safetensors", "model.safetensors.index.json")
    if any((folder / name).is_file() for name in safetensors):
        return
    fix = "fix: copy it again, or write the folder again with save_pretrained"
    for file in weight_files(folder, "pytorch_model.bin"):
        if (problem := torch_file_problem(file, fix)) is not None:
            raise UsageError(f"{file}: {problem}")
        with open(file, "rb") as stream:
            legacy = stream.read(1) == b"\x80"  # a zip archive starts with PK
        if legacy:  # of protocol 2 or 3
            try:
                torch.load(file, map_location="meta", weights_only=True)
            except Exception as error:  # a storage's bytes cut short, or a torn pickle
                raise _unreadable(file, str(error)) from None


# The SentencePiece model files of Hugging Face folders (ALBERT's and XLNet's, XLM-R's and
# CamemBERT's, DeBERTa-v2's, T5's, Llama 1/2's and Mistral's), which transformers reads with the
# sentencepiece package.
SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "spm.model", "tokenizer.model")


def check_sentencepiece(folder: Path) -> None:
    """Where a folder's tokenizer failed to load, a `UsageError` naming the sentencepiece package
    when the folder has a SentencePiece model and no tokenizer.json to read instead: without the
    package transformers falls back to tiktoken's reader, whose error asked to install tiktoken
    (no help) and lowbit's to save tokenizer files into a folder that holds them."""
    if (folder / "tokenizer.json").is_file() or importlib.util.find_spec("sentencepiece"):
        return
    model = next((folder / name for name in SENTENCEPIECE_FILES if (folder / name).is_file()), None)
    if model is not None:
        raise UsageError(
            f"{model}: a SentencePiece tokenizer, which needs the sentencepiece package (not "
            "installed); fix: pip install sentencepiece"
        )


# The counts of a config.json that make no model below 1, as the architectures spell them (GPT-2's
# n_layer, XLM's n_layers). transformers validates none of them: a layer count below one built a
# model of no layers that `lowbit estimate` sized and `lowbit train` stopped in with a traceback of
# transformers' cache code, and a vocabulary of 0 failed deep inside it. A negative width or head
# count is left to transformers, whose failure to build the model is refused in one line naming
# its error (`from_pretrained`). Not ``intermediate_size``, which sizes only dense MLPs (0 in
# Qwen3-MoE configs whose every layer has experts), nor ``max_position_embeddings``, -1 for "no
# limit" in OLMo-core's exports of rotary models (the sequence-length check answers for it).
SIZE_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "vocab_size")


def check_sizes(file: Path, fields: dict) -> None:
    """A `UsageError` naming the first count or size of ``fields`` (or of its ``text_config``: a
    multimodal model's language model) that is an integer below 1."""
    nested = fields.get("text_config")
    places = [("", fields), *([("text_config.", nested)] if isinstance(nested, dict) else [])]
    for prefix, place in places:
        for name in SIZE_FIELDS:
            value = place.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise UsageError(
                    f'{file}: "{prefix}{name}": {value} makes no model; fix: set it to a '
                    "positive integer (the checkpoint's own value, as save_pretrained writes it)"
                )


def load_config(path: Path, **kwargs):
    """The ``AutoConfig`` of a checkpoint folder or of a config.json file, with ``kwargs`` set in
    it; a `UsageError` when the file is not a JSON object, has no ``model_type``, or transformers
    rejects it otherwise."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoConfig

    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(
            f"{file}: not valid JSON ({error}); fix: correct it, or write it with save_pretrained"
        ) from None
    if not isinstance(fields, dict):
        raise UsageError(f"{file}: not a JSON object; fix: write it with save_pretrained")
    kind = fields.get("model_type")
    known = isinstance(kind, str) and kind in CONFIG_MAPPING
    # An "auto_map" names Python files shipped in the folder that define the architecture
    # (trust_remote_code): "upgrade transformers" misled, as the architecture is the folder's
    # own, and lowbit never runs code from a model folder. Where transformers has the model_type itself,
    # it builds its own class, as transformers does without trust_remote_code.
    if "auto_map" in fields and not known:
        raise UsageError(
            f"{file}: the architecture{f' {kind!r}' if isinstance(kind, str) else ''} is "
            "defined by Python code in the folder (auto_map), which lowbit does not run "
            "(no trust_remote_code); fix: use a checkpoint of an architecture transformers has "
            "(Llama, Qwen2, Mistral, GPT-2, BERT, ...)"
        )
    if isinstance(kind, str) and not known:  # transformers' own text is a page
        raise UsageError(
            f"{file}: unknown model_type {kind!r}; fix: correct it, or upgrade transformers if "
            "the architecture is newer than it"
        )
    check_sizes(file, fields)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
    except (ValueError, TypeError, StrictDataclassError) as error:  # the fields' own validation
        # without a model_type transformers can only guess the architecture from the folder name
        if "model_type" not in fields:
            raise UsageError(
                f'{file}: no "model_type" field; fix: add the architecture\'s name, '
                'e.g. "model_type": "llama"'
            ) from None
        raise UsageError(
            f"{file}: transformers cannot read this config ({' '.join(str(error).split())}); "
            "fix: correct the config's fields"
        ) from None


def from_pretrained(
    auto_class,
    folder: Path,
    ignore_mismatched_sizes: bool = False,
    loading_info: bool = False,
    **kwargs,
):
    """``auto_class.from_pretrained(folder)`` offline, with SDPA attention where it exists; a
    fresh model from the folder's config where it holds no weights (see the module doc).
    ``kwargs`` set config fields; ``ignore_mismatched_sizes``: initialize afresh the weights whose
    shape those fields changed (a head of other labels) instead of refusing to load.
    ``loading_info``: return ``(model, info)``, ``info`` transformers' ``missing_keys``,
    ``unexpected_keys`` and ``mismatched_keys`` (all empty where the folder has no weights), and
    leave transformers' load report unprinted: it tabulates the same keys in a dozen lines, most
    of them expected in a fine-tuning (a head drawn afresh), so the caller says what matters.

    Parameters are fp32 whatever dtype the config names (a published config.json or a
    ``lowbit export --dtype bf16`` says bfloat16, and transformers builds in that dtype): the
    recipe decides the training dtypes, and fp32 or bf16-mixed on bf16 parameters would train
    without the fp32 weights they promise."""
    config = load_config(folder, **kwargs)  # checked here also before a weights load reads it
    if not has_weights(folder):
        try:  # a copy each try: a refused SDPA model has set its attention implementation in it
            model = with_sdpa(
                lambda **kw: auto_class.from_config(
                    copy.deepcopy(config), dtype=torch.float32, **kw
                )
            )
        except (ValueError, *BUILD_ERRORS) as error:
            raise UsageError(
                f"{folder / 'config.json'}: transformers cannot build a model from this config "
                f"({type(error).__name__}: {' '.join(str(error).split())}); fix: correct the "
                "config's fields"
            ) from None
        empty = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
        return (model, empty) if loading_info else model
    check_safetensors(folder)
    check_pytorch_bin(folder)
    try:
        with _load_report_unsaid(loading_info, mismatched=not ignore_mismatched_sizes):
            return with_sdpa(
                lambda **kw: auto_class.from_pretrained(
                    folder,
                    local_files_only=True,
                    ignore_mismatched_sizes=ignore_mismatched_sizes,
                    output_loading_info=loading_info,
                    dtype=torch.float32,
                    **kwargs,
                    **kw,
                )
            )
    except RuntimeError as error:  # its load report, left unsaid, listed the tensors
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise UsageError(
            f"{folder / 'config.json'}: does not fit the weights beside it "
            f"({_misfit(auto_class, config, folder)}); fix: {refit_fix(folder)}"
        ) from None


def refit_fix(folder: Path) -> str:
    """The fix for a config.json that does not fit the weights beside it: in a `lowbit export`
    folder, the export command that writes that config again (`export_again`)."""
    if is_export(folder):
        return f"restore the config.json that lowbit export wrote ({export_again(folder)})"
    return "restore the config.json saved with these weights"


def export_again(folder: Path) -> str:
    """The `lowbit export` command that writes the export ``folder`` again, as its
    ``lowbit_export.json`` records it: its source, and its ``--dtype`` where not the default."""
    from lowbit.train.config import EXPORT_INFO, exported_from

    source = exported_from(folder) or "SRC"
    command = f"lowbit export {shlex.quote(source)} --out {shlex.quote(str(folder))} --force"
    try:
        dtype = json.loads((Path(folder) / EXPORT_INFO).read_text(encoding="utf-8"))["dtype"]
    except (OSError, ValueError, KeyError, TypeError):
        dtype = None
    if isinstance(dtype, str) and dtype != "fp32":
        command += f" --dtype {shlex.quote(dtype)}"
    return command


def _misfit(auto_class, config, folder: Path) -> str:
    """The first tensor of the folder's safetensors weights whose shape is not the one the
    model that ``config`` builds has, with both shapes, for the refusal of a config.json edited
    or copied from another model (transformers tabulates every such tensor and raises a
    traceback). The model is built on the meta device: shapes only, no memory."""
    from safetensors import safe_open

    unnamed = "tensors of other shapes than the config's model has"
    try:
        with torch.device("meta"):
            model = auto_class.from_config(copy.deepcopy(config))
    except (ValueError, NotImplementedError, *BUILD_ERRORS):  # an op meta tensors lack
        return unnamed
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    for file in weight_files(folder, "model.safetensors"):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
                stored = list(weights.get_slice(name).get_shape())
                if name in shapes and shapes[name] != stored:
                    return (
                        f"{name} is {stored} in {file.name}, {shapes[name]} in the config's model"
                    )
    return unnamed


def is_export(folder) -> bool:
    """Whether ``folder`` holds weights that `lowbit export` wrote (its ``lowbit_export.json``)."""
    from lowbit.train.config import EXPORT_INFO

    return (Path(folder) / EXPORT_INFO).is_file() and has_weights(folder)


def check_export_keys(folder: Path, info: dict) -> None:
    """Refuse an export whose config.json builds a model of other weights than `lowbit export`
    wrote beside it (``info``: transformers' ``missing_keys`` and ``unexpected_keys``): a layer
    count edited, or a config copied from another model. Each such weight is in the folder only
    where the config is its own, so transformers' table of them (layers drawn afresh, or
    dropped) came before a fine-tuning of another model than the one exported."""
    said = []
    for keys, where in (
        ("missing_keys", "not in the weights"),
        ("unexpected_keys", "in the weights but not in the model"),
    ):
        names = sorted(info[keys])
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            said.append(f"{names[0]}{more}: {where}")
    if said:
        raise UsageError(
            f"{folder / 'config.json'}: does not fit the weights beside it ({'; '.join(said)}); "
            f"fix: {refit_fix(folder)}"
        )


def check_shapes_fit(folder: Path, mismatched: list) -> None:
    """Refuse the folder whose config.json builds weights of other shapes than the folder holds
    (``mismatched``: transformers' ``mismatched_keys`` the caller did not expect, each a name, its
    shape in the weights and in the model), naming the first: loaded with
    ``ignore_mismatched_sizes``, each is drawn afresh, which for a size edited in the config
    trained the encoder from random values under a warning."""
    if mismatched:
        name, stored, built = sorted(mismatched, key=lambda item: item[0])[0]
        more = f"; {len(mismatched) - 1} more of other shapes" if len(mismatched) > 1 else ""
        raise UsageError(
            f"{folder / 'config.json'}: does not fit the weights beside it ({name} is "
            f"{list(stored)} in the weights, {list(built)} in the config's model{more}); "
            f"fix: {refit_fix(folder)}"
        )


def check_export_weights(path) -> None:
    """Refuse the --model ``path`` of a new run where it is a folder that `lowbit export` wrote
    (its ``lowbit_export.json`` beside) whose weights file is gone (a copy that left it behind;
    of sharded weights, their index): a folder without weights trains its config's architecture
    from a fresh initialization (the module doc), which for an export meant fine-tuning a random
    model under the name of the trained one, without a word. A run fine-tuned from it needs them
    no more (its checkpoint holds its weights), so it is not checked when a run is built again."""
    from lowbit.train.config import EXPORT_INFO

    folder = Path(path)
    if not (folder / EXPORT_INFO).is_file() or has_weights(folder):
        return
    raise UsageError(
        f"{folder}: {EXPORT_INFO} lists {_missing_weights(folder / EXPORT_INFO)}, not in the "
        f"folder; fix: copy it back, or export again ({export_again(folder)}); "
        f"{folder / 'config.json'} alone trains its architecture afresh"
    )


def _missing_weights(record: Path) -> str:
    """The weights files an export's ``record`` lists that are not beside it: ``model.safetensors``,
    or the index of its shards (a shard the index names is told by `weight_files`); that file
    where the record cannot be read."""
    try:
        files = json.loads(record.read_text(encoding="utf-8"))["files"]
        names = [name for name in files if name in WEIGHT_FILES]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    missing = [name for name in names if not (record.parent / name).is_file()]
    return missing[0] if missing else "model.safetensors"


def _drop_load_report(record: logging.LogRecord) -> bool:
    """False for transformers' load report, unless it lists weight conversion errors: transformers
    raises after such a report, pointing the user to its "CONVERSION entries" above."""
    text = record.getMessage()
    return "LOAD REPORT" not in text or "CONVERSION" in text


def _drop_mismatch_report(record: logging.LogRecord) -> bool:
    """False for transformers' load report where it lists tensors of another shape than the model
    has, after which transformers raises: `from_pretrained` names the first in one line."""
    text = record.getMessage()
    return "LOAD REPORT" not in text or "MISMATCH" not in text


@contextlib.contextmanager
def _load_report_unsaid(on: bool, mismatched: bool = False):
    """transformers' load report kept off the stderr handler transformers installs, within, when
    ``on`` (with ``mismatched``, only a report of tensors of another shape, which `from_pretrained`
    refuses in a line of its own). The record is still logged for the handlers a program adds
    (pytest's caplog among them), so the filter goes on that one handler, not on the logger.
    transformers names it only privately (``_default_handler``); should that name go, the report
    prints as before."""
    from transformers.utils import logging as hf_logging

    handler = getattr(hf_logging, "_default_handler", None) if on or mismatched else None
    if handler is None:
        yield
        return
    drop = _drop_load_report if on else _drop_mismatch_report
    handler.addFilter(drop)
    try:
        yield
    finally:
        handler.removeFilter(drop)


# Files of a model folder up to this size are fingerprinted by their contents (config, tokenizer,
# index files); larger ones, the weights, by size and modification time: hashing gigabytes of
# weights on every `lowbit compare` would cost as much as a short run.
HASHED_MAX_BYTES = 1 << 20


def folder_fingerprint(path) -> dict[str, str] | None:
    """What a model folder (or a config.json file) holds now, file by file: ``sha256:<hex>`` of a
    small file's contents, ``size:<bytes>,mtime:<ns>`` of a large one. A compare study records it
    with each run, so that weights trained again or a config edited in the same folder since are
    told from the contents its finished runs trained from. Top-level files only (transformers
    reads no subfolder), hidden files and Markdown (a model card) left out; None where nothing
    readable is at ``path``."""
    import hashlib

    path = Path(path)
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
        out = {}
        for file in files:
            if file.name.startswith(".") or file.suffix == ".md" or not file.is_file():
                continue
            stat = file.stat()
            if stat.st_size <= HASHED_MAX_BYTES:
                out[file.name] = "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()
            else:
                out[file.name] = f"size:{stat.st_size},mtime:{stat.st_mtime_ns}"
    except OSError:  # unreadable: the run that builds the model names the problem
        return None
    return out or None


# Fields of a config.json that do not change the network a checkpoint is loaded into: what
# save_pretrained writes of itself and of where the model came from, the class it names (the
# task builds its own head), the dtype, which `from_pretrained` overrides (fp32 whatever it
# names), the special token ids, which say where generation starts and stops (an export copies
# them, as the folder names them now), and whether generation caches keys and values.
UNMODELLED_FIELDS = (
    "transformers_version",
    "_name_or_path",
    "architectures",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
)

# The files a Hugging Face tokenizer is read from. A token classifier reads its --model folder's
# tokenizer every time it is loaded (a causal LM's run keeps its own copy in tokenizer/).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
)


def _config_fields(path) -> dict | None:
    """The fields of a --model folder's config.json (or of that file) that decide the model,
    None where it cannot be read (the load that builds the model names the problem)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(fields, dict):
        return None
    return {key: value for key, value in fields.items() if key not in UNMODELLED_FIELDS}


def model_record(path, task: str = "causal-lm") -> dict | None:
    """What a run of ``task`` trained from the --model folder (or config.json) ``path`` records of
    it, so that loading the run later can tell whether the folder still builds the model its
    checkpoint was trained in (`model_changes`): the config's fields and the tokenizer files'
    sha256 (hashed whatever their size, a few MB at most: a copy that only touched one is no
    change). The weights are left out on purpose: a checkpoint holds every trained weight, so
    weights trained again or replaced in the folder change nothing a run loads. An encoder's
    causal LM also records ``as_decoder``, the fields that built it as a decoder
    (`lowbit.models.causal_lm.decoder_fields`): a run without them attended both ways."""
    from lowbit.models.causal_lm import decoder_fields

    config = _config_fields(path)
    if config is None:
        return None
    folder = Path(path)
    tokenizer = file_hashes(folder, TOKENIZER_FILES) if folder.is_dir() else {}
    record = {"config": config, "tokenizer": tokenizer}
    as_decoder = decoder_fields(path) if task == "causal-lm" else []
    return {**record, "as_decoder": as_decoder} if as_decoder else record


def _as_built(fields: dict) -> dict:
    """A config's fields as the installed transformers builds them (``AutoConfig.for_model``
    then ``to_dict``): defaults written out, older spellings moved (transformers 4's top-level
    ``rope_theta`` is 5's ``rope_parameters.rope_theta``), so that a folder saved again, by this
    version or another, compares equal to the fields it was trained with. The fields as given
    where transformers does not know the model type. The special token ids, left out of the
    record, are built as None, not as the class's defaults: GPT-2's 50256 outside a small
    vocabulary made transformers warn of the user's config at every load of the run. A strict
    config class that refuses None ids (17 types in transformers 5.25, ModernBERT's decoder among
    them) is built with its own: refused, the fields were compared as written, with no defaults,
    and the folder saved again read as changed."""
    from transformers import AutoConfig

    given = dict(fields)
    model_type = given.pop("model_type", None)
    no_ids = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    for tried in ({**given, **no_ids}, given):
        try:
            built = AutoConfig.for_model(model_type, **tried).to_dict()
        except Exception:  # no model_type, or one this transformers lacks: compared as written
            continue
        return {key: value for key, value in built.items() if key not in UNMODELLED_FIELDS}
    return fields


def model_changes(recorded: dict, path, tokenizer: bool) -> list[str]:
    """What differs between a `model_record` and the folder at ``path`` now, in words: each
    config field changed (``rope_theta 10000.0 -> 500000.0``), compared as transformers builds
    both (`_as_built`), and with ``tokenizer`` (a run that reads its tokenizer from the folder)
    each tokenizer file changed, added or removed. Empty where nothing that matters changed, or
    where the folder cannot be read now (the load names that)."""
    now = model_record(path)
    if now is None or not isinstance(recorded, dict):
        return []
    then_config = _flat(_as_built(recorded.get("config") or {}))
    now_config = _flat(_as_built(now["config"]))
    changes = [
        f"config.json {key} {_short(then_config, key)} -> {_short(now_config, key)}"
        for key in sorted(set(then_config) | set(now_config))
        if then_config.get(key, _ABSENT) != now_config.get(key, _ABSENT)
    ]
    if tokenizer:
        changes += file_changes(recorded.get("tokenizer") or {}, now["tokenizer"])
    return changes


def file_hashes(folder, names) -> dict[str, str]:
    """The sha256 (``sha256:HEX``) of each file of ``names`` in ``folder`` that is there, by name;
    hashed whatever its size (tokenizer files: a few MB at most). One not there, or unreadable
    (the load that reads it names the problem), is left out."""
    import hashlib

    hashes = {}
    for name in names:
        try:
            hashes[name] = (
                "sha256:" + hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()
            )
        except OSError:
            continue
    return hashes


def file_changes(then: dict, now: dict) -> list[str]:
    """Each file of two `file_hashes` that was changed, added or removed, in words
    (``tokenizer.json changed``)."""
    changes = []
    for name in sorted(set(then) | set(now)):
        if name not in now:
            changes.append(f"{name} removed")
        elif then.get(name) != now[name]:
            changes.append(f"{name} {'changed' if name in then else 'added'}")
    return changes


_ABSENT = object()


def _flat(fields: dict, prefix: str = "") -> dict:
    """A config's fields with those of nested objects under dotted names
    (``rope_parameters.rope_theta``): a change is named by the field that changed in them."""
    out = {}
    for key, value in fields.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(fields: dict, key: str, limit: int = 40) -> str:
    """A config field's value as JSON, cut short (a long list), or "absent"."""
    if key not in fields:
        return "absent"
    text = json.dumps(fields[key])
    return text if len(text) <= limit else text[: limit - 3] + "..."
