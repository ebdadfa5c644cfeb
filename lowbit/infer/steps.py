"""The three steps behind the commands: quantize a run, prune a run, export to Hugging Face."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import UsageError, a_task_run, check_given
from lowbit.infer import io
from lowbit.infer.model import (
    LayerReport,
    dequantize_model,
    parse_pattern,
    prune_model,
    quantize_model,
    sparsity_of,
)
from lowbit.infer.quant import QuantRecipe
from lowbit.train.trainer import progress_bars_off


@dataclass
class StepResult:
    out: Path
    manifest: dict
    report: LayerReport
    source: io.Source
    model: torch.nn.Module
    reference: torch.nn.Module | None = None  # the model before the step (prune only)


def _linear_bytes(model) -> int:
    from lowbit.infer.model import linear_weights, quant_layers

    total = sum(w.numel() * w.element_size() for w in linear_weights(model))
    for layer in quant_layers(model).values():
        total += sum(t.numel() * t.element_size() for t in layer.stored().values())
    return total


def _source_linear_bytes(source: io.Source) -> int:
    """Bytes of the source's linear weights as quantization starts from them (`io.source_bytes`;
    an inference folder stores the fp32 model it loads as)."""
    from lowbit.infer.model import linear_weights

    if source.manifest is not None:
        return _linear_bytes(source.model)
    sizes = source.original_sizes
    names = {id(p): n for n, p in source.model.named_parameters()}  # a tied weight's first name
    return sum(sizes[names[id(weight)]] for weight in linear_weights(source.model))


def _load_source(path) -> io.Source:
    """The run or inference folder ``path`` loaded on the CPU, without transformers' "Loading
    weights" bar (the step reports itself)."""
    with progress_bars_off(True):
        return io.load_source(path, "cpu")


def _refused_folder(path, refused) -> io.Source | None:
    """The inference folder ``path`` loaded where its manifest is one that the step refuses
    (``refused(manifest)``: quantize a quantized one, prune any), before --out's checks: their
    default --out, there from the step that made the folder, was refused first as not empty, the
    real problem said only once the user had cleared it. Loaded, not only its manifest read, so
    that a damaged or config-less folder's own error comes first. None for a run or a folder the
    step takes: --out is checked before their load (seconds, minutes at 7B)."""
    if not io.is_inference_dir(path) or not refused(io.read_manifest(path)):
        return None
    return _load_source(path)


def quantize_run(
    path,
    to: str,
    mode: str = "weights-only",
    group_size: int | None = None,
    pad_groups: bool | None = None,
    out=None,
    force: bool = False,
) -> StepResult:
    """Quantize every linear layer of a run (or of a pruned folder) and write the folder."""
    recipe = QuantRecipe(to, mode, group_size, pad_groups)  # bad flags fail before loading
    if pad_groups and recipe.group is None:  # the flag, not `recipe.pads` (False per row)
        raise UsageError(
            f"--pad-groups pads the last group of a row, and {recipe.format.value} without "
            "--group-size keeps one scale per row (no groups); fix: drop --pad-groups, or add "
            "--group-size G"
        )
    check_given(out, "--out")
    source = _refused_folder(path, lambda manifest: manifest.get("quantization"))
    if source is not None:
        raise UsageError(
            f"{path} is already quantized ({io.describe_manifest(source.manifest)}); fix: "
            f"quantize its source, {source.manifest['source']['path']}"
        )
    target = out or io.default_out(path, recipe.format.value)
    io.check_target(target, path, force)  # before loading and quantizing
    source = _load_source(path)
    linear_before = _source_linear_bytes(source)
    record = io.source_record(source)  # the weights as loaded, before they are quantized
    report = quantize_model(source.model, recipe)
    manifest = {
        "quantization": recipe.to_dict(),
        "pruning": (source.manifest or {}).get("pruning"),
        "source": record,
        "task": source.config.task,
        "model": source.config.model,
        "layers": list(report.changed),
        "kept": report.kept,
        "linear_bytes": {"original": linear_before, "quantized": _linear_bytes(source.model)},
    }
    written = io.save(source, source.model, manifest, target, force)
    return StepResult(written, io.read_manifest(written), report, source, source.model)


def prune_run(path, sparsity=None, pattern: str | None = None, out=None, force=False) -> StepResult:
    """Magnitude-prune the linear layers of a run and write the (dense-stored) folder."""
    nm = parse_pattern(pattern) if pattern is not None else None
    if (sparsity is None) == (nm is None):
        raise UsageError("give one of --sparsity S or --pattern N:M (e.g. --pattern 2:4)")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise UsageError(f"--sparsity {sparsity} is outside [0, 1); fix: use e.g. 0.5")
    check_given(out, "--out")
    # the percentage as given (up to 6 digits): rounded to a whole one, 0.99999 read "100%" and
    # 0.504 wrote the folder RUN_DIR-sparse50 that --force then took for 0.5's
    percent = f"{sparsity * 100:g}" if nm is None else None
    source = _refused_folder(path, lambda manifest: True)
    if source is not None:  # a quantized folder's source may itself be pruned: the run, first
        raise UsageError(
            f"{path} is already {io.describe_manifest(source.manifest)}; fix: prune the run it "
            f"came from, {io.training_run(path)}, then quantize"
        )
    target = out or io.default_out(path, f"{nm[0]}of{nm[1]}" if nm else f"sparse{percent}")
    io.check_target(target, path, force)  # before loading and pruning
    source = _load_source(path)
    reference = copy.deepcopy(source.model)
    record = io.source_record(source)  # the weights as loaded, before they are pruned
    report = prune_model(source.model, sparsity, nm)
    rule = f"{nm[0]}:{nm[1]}" if nm else f"{percent}% unstructured"
    manifest = {
        "quantization": None,
        "pruning": {"rule": rule, "sparsity": sparsity_of(source.model), "method": "magnitude"},
        "source": record,
        "task": source.config.task,
        "model": source.config.model,
        "layers": list(report.changed),
        "kept": report.kept,
    }
    written = io.save(source, source.model, manifest, target, force)
    return StepResult(written, io.read_manifest(written), report, source, source.model, reference)


def _untie_quantized_head(model) -> None:
    """A tied LM head (GPT-2's, a tied Llama's) that was quantized no longer equals the embedding,
    which stays as trained: the exported config says so, or a loader that ties by the config
    would give the head the embedding's weights (transformers 5 keeps both, with a warning).
    A multimodal config (Gemma 3's) says it twice, at the top and in its ``text_config``: both
    are set, as a loader may read either."""
    config, head = getattr(model, "config", None), model.get_output_embeddings()
    if config is None or head is None or head.weight is model.get_input_embeddings().weight:
        return
    for part in (config, config.get_text_config()):  # the same config where there is one
        if getattr(part, "tie_word_embeddings", False):
            part.tie_word_embeddings = False


def _end_of_text_ids(model, tokenizer) -> None:
    """Name lowbit's end-of-text id (byte tokenizer: 256; BPE: its ``<|endoftext|>``) as the
    exported config's and generation config's ``eos_token_id`` and ``bos_token_id``, as GPT-2's
    do: a named size's config otherwise keeps LlamaConfig's defaults, 1 and 2, which are bytes
    here, so transformers' ``generate`` would stop at byte 0x02 and not where the run's documents
    end (and start an empty prompt at byte 0x01, where `lowbit generate` starts at end-of-text).
    A Hugging Face tokenizer's ids are the model folder's own and stay, but its end-of-text id
    (the one the run joined documents with and `lowbit generate` stops at) is added to an
    ``eos_token_id`` that lacks it: a fresh model from a config.json beside a tokenizer keeps
    LlamaConfig's eos 2 whatever the tokenizer's is, and transformers' ``generate`` then ran on
    past the end of every document."""
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        if tokenizer.kind in ("byte", "bpe"):
            config.bos_token_id = config.eos_token_id = tokenizer.eot_id
            continue
        eos = getattr(config, "eos_token_id", None)  # Gemma 3's top config names none
        ids = list(eos) if isinstance(eos, list | tuple) else [] if eos is None else [eos]
        if tokenizer.eot_id not in ids:
            config.eos_token_id = [*ids, tokenizer.eot_id] if ids else tokenizer.eot_id


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # as transformers reads them


def _shard_bytes(size: str) -> int:
    """``--max-shard-size`` in bytes: a positive number and a unit, as transformers' own
    ``max_shard_size`` (``500MB``, ``5GB``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", size, re.IGNORECASE)
    if match is None or float(match[1]) * _SIZE_UNITS[match[2].upper()] < 1:
        raise UsageError(
            f"--max-shard-size {size!r} is not a size; fix: give a positive number and a unit "
            "(KB, MB, GB, TB), e.g. 5GB"
        )
    return int(float(match[1]) * _SIZE_UNITS[match[2].upper()])


def refuse_other_tasks(path, fix: str) -> None:
    """Refuse a run (or a folder quantized or pruned from one) of another task than causal-lm by
    its config.yaml, before loading it: building a token-classification run's task reads its
    data, and where that had moved the refusal that applies hid behind "no such CoNLL file". A
    folder without config.yaml is left to the loader, which says what it is."""
    from lowbit.train.config import read, resolve

    check_given(path, "RUN_DIR")
    if not (Path(path) / "config.yaml").is_file():
        return
    task = resolve(read(path)).task
    if task != "causal-lm":
        what = a_task_run(task)
        if io.is_inference_dir(path):  # the folder is no run: it was made from one
            what = f"a folder quantized or pruned from {what}"
        raise UsageError(f"{path} is {what}; fix: {fix}")


def _refuse_beyond_fp16(model) -> None:
    """An fp16 export of weights past fp16's largest value (65504; 65520 and above round to inf)
    wrote them as inf without a word, and transformers then computes inf/NaN logits. Parameters
    only: a buffer may hold fp32's extremes on purpose (a mask, a clip bound), which fp16's inf
    stands for as well."""
    for name, tensor in model.named_parameters():
        tensor = tensor.detach()
        if not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if (torch.isinf(tensor.to(torch.float16)) & finite).any():
            largest = tensor[finite].abs().max().item()
            raise UsageError(
                f"--dtype fp16: {name} holds |w| up to {largest:.6g}, beyond fp16's largest "
                f"{torch.finfo(torch.float16).max:g} (it would be written as inf); fix: use "
                "--dtype bf16 (fp32's range) or --dtype fp32"
            )


def export_hf(
    path, out, dtype: str = "fp32", force: bool = False, max_shard_size: str = "50GB"
) -> dict:
    """Write a causal LM (run or inference folder) as a Hugging Face folder, weights dequantized,
    in ``model-0000N-of-0000M.safetensors`` shards of at most ``max_shard_size`` each where the
    model is larger (one ``model.safetensors`` otherwise)."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise UsageError(f"unknown --dtype {dtype!r}; fix: use {', '.join(dtypes)}")
    shard_bytes = _shard_bytes(max_shard_size)
    check_given(out, "--out")
    refuse_other_tasks(
        path, "export a causal-lm run (the Hugging Face folder is an AutoModelForCausalLM)"
    )
    io.check_target(out, path, force)  # before loading
    # transformers' "Loading weights" and "Writing model shards" bars: the command reports itself
    with progress_bars_off(True):
        source = io.load_source(path, "cpu")
        dequantize_model(source.model)
        if dtype == "fp16":  # before anything is written to --out
            _refuse_beyond_fp16(source.model)
        _untie_quantized_head(source.model)
        _end_of_text_ids(source.model, source.task.tokenizer)
        with io.staged_out(out, force) as staging:
            model = source.model.to(dtypes[dtype])
            return _write_export(source, model, dtype, staging, shard_bytes)


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> character table (``bytes_to_unicode``), which the ``tokenizers`` library's
    ByteLevel pre-tokenizer and decoder use: printable Latin-1 bytes stand for themselves, the
    others for the characters from U+0100 on, in byte order."""
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _transformers_tokenizer(tokenizer, saved: Path, out: Path) -> list[str]:
    """The files that make lowbit's byte or BPE tokenizer load with transformers'
    ``AutoTokenizer.from_pretrained(out)`` (the names written): lowbit_tokenizer.json is lowbit's
    own, which transformers cannot read, and a BPE tokenizer.json without a tokenizer_config.json
    was taken for the config's model type's tokenizer (Llama's), which rebuilds it with other
    pre-tokenization. The byte tokenizer becomes a byte-level BPE without merges whose ids are
    the bytes, so both give the ids the model was trained on; the end-of-text id is its eos, as
    the exported config's (`_end_of_text_ids`). A Hugging Face tokenizer's own files, copied from
    the run, need nothing. Files the run's tokenizer folder brought (BPE's tokenizer.json) stay as
    copied."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowbit.data.tokenizers import EOT_TEXT

    if tokenizer.kind == "byte":
        vocab = {char: byte for byte, char in _byte_level_chars().items()}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([EOT_TEXT])  # id 256, the byte tokenizer's end-of-text
    elif tokenizer.kind == "bpe":
        backend = Tokenizer.from_file(str(saved / "tokenizer.json"))
    else:
        return []
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOT_TEXT, bos_token=EOT_TEXT
    )
    written = []
    with tempfile.TemporaryDirectory(dir=out) as folder:
        wrapped.save_pretrained(folder)
        for item in sorted(Path(folder).iterdir()):
            if item.is_file() and not (out / item.name).exists():
                os.replace(item, out / item.name)
                written.append(item.name)
    return written


def _write_export(source: io.Source, model, dtype: str, out: Path, shard_bytes: int) -> dict:
    """The files of a Hugging Face export of ``model``, written into the empty folder ``out``."""
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard_bytes)
    copied = []
    tokenizer = source.path / "tokenizer"
    if tokenizer.is_dir():
        for item in tokenizer.iterdir():
            if item.is_file():
                shutil.copy2(item, out / item.name)
                copied.append(item.name)
    copied += _transformers_tokenizer(source.task.tokenizer, tokenizer, out)
    info = {
        "source": str(source.path.resolve()),
        "step": source.step,
        "quantization": (source.manifest or {}).get("quantization"),
        "pruning": (source.manifest or {}).get("pruning"),
        "dtype": dtype,
        "stored": "dequantized" if source.quantized else "as trained",
        "original": source.original,
        # transformers shards a large model into model-0000N-of-0000M.safetensors
        "bytes": sum(file.stat().st_size for file in out.glob("*.safetensors")),
        "tokenizer_files": copied,
        # everything this export wrote, itself included: what a later --force replaces
        "files": io.listing(out, io.EXPORT_INFO),
    }
    (out / io.EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info
