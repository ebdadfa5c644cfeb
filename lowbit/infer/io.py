"""Inference folders: a quantized or pruned model beside the run settings it came from.

```
RUN_DIR-int8/
  quantization.json    what was done (recipe, pruning, layers), the source, sizes
  model.safetensors    every tensor of the model; quantized layers as <name>.qweight/.scale[...]
  config.yaml          the source run's settings (task, model, data, tokenizer), copied
  tokenizer/ | vocab.json   the run's tokenizer or word vocabulary, copied
```

`load_source` reads either kind of folder, a training run (its latest checkpoint, weights in
fp32, the master weights of a recipe with them) or an inference folder, as a `Source`; everything
else in `lowbit.infer` works on those.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lowbit.errors import UsageError, check_given, check_writable, file_in_the_way
from lowbit.folder_lock import lock_folder
from lowbit.train.config import EXPORT_INFO, exported_from

MANIFEST = "quantization.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # transformers' map of a sharded export's weights
VERSION = 1
_COPIED = ("config.yaml", "tokenizer", "vocab.json", "labels.json")
# what makes a folder an inference folder or an export: moved in last, moved away first
MANIFESTS = (MANIFEST, EXPORT_INFO)
# The names an inference folder or an export writes: beside neither manifest, a file of one of
# them is the user's, and `_check_out` refuses such a folder even with --force.
_ARTIFACTS = (
    MANIFEST,
    WEIGHTS,
    *_COPIED,
    "config.json",
    "generation_config.json",
    INDEX,  # an export transformers sharded
    EXPORT_INFO,
)
# What a quantized or pruned folder written before its manifest listed its files (`listing`) is
# taken to hold: a folder of either kind never wrote an export's config.json or index.
_FOLDER_WROTE = (MANIFEST, WEIGHTS, *_COPIED)
# transformers' shards of a large export (`save_pretrained`'s max_shard_size): a folder of a model
# whose shards no manifest describes is refused (`_check_out`); --force replaces an earlier
# export's shards by their names in its file list or index, never by this pattern (`_artifacts`)
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


@dataclass
class Source:
    path: Path
    config: object
    task: object
    model: torch.nn.Module
    manifest: dict | None  # None for a training run
    checkpoint: Path | None
    step: int
    # What quantize and prune start from, for the sizes they print against it: the bytes of each
    # state tensor by name, and their kind in words ("fp32 master weights", "bf16 weights")
    original_sizes: dict[str, int] | None  # None for an inference folder: its file's size
    original: str

    @property
    def quantized(self) -> bool:
        return bool(self.manifest and self.manifest.get("quantization"))

    def describe(self) -> str:
        if self.manifest is None:
            return f"{self.path} ({self.checkpoint.name}, step {self.step})"
        return f"{self.path} ({describe_manifest(self.manifest)})"


def describe_manifest(manifest: dict) -> str:
    parts = []
    if manifest.get("pruning"):
        parts.append(f"pruned {manifest['pruning']['rule']}")
    q = manifest.get("quantization")
    if q:
        group = f"groups of {q['group_size']}" if q["group_size"] else "one scale per row"
        parts.append(f"{q['format']} {q['mode']}, {group}")
    return ", ".join(parts) or "unchanged"


def is_inference_dir(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path) -> dict:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}/{MANIFEST}: unreadable ({error}); fix: quantize again") from None
    if isinstance(manifest, dict) and manifest.get("version") != VERSION:
        raise UsageError(
            f"{path}: written by another lowbit version (format {manifest.get('version')}); "
            "fix: quantize again"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise UsageError(f"{path}/{MANIFEST}: {problem} (edited by hand?); fix: quantize again")
    return manifest


def _manifest_problem(manifest) -> str | None:
    """What keeps a manifest of this version from being read (a file edited or damaged into
    other JSON): each reader takes these entries for granted, and one missing would be a
    traceback in whichever command came to it first."""
    from lowbit.infer.quant import QuantRecipe

    if not isinstance(manifest, dict):
        return "not a JSON object"
    source = manifest.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("path"), str):
        return "no source path"
    if not isinstance(source.get("step"), int):
        return "no source step"
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
        return "no list of the layers it changed"
    pruning = manifest.get("pruning")
    if pruning is not None and not (isinstance(pruning, dict) and "rule" in pruning):
        return "a pruning entry without its rule"
    q = manifest.get("quantization")
    if q is not None:
        try:
            QuantRecipe.from_dict(q)
        except (UsageError, ValueError, TypeError, KeyError) as error:
            return f"a quantization it cannot read ({_one_line(error).split('; fix:')[0]})"
    return None


def training_run(path) -> Path:
    """The training run an inference folder comes from, through the pruned folder a quantized one
    may have been made from (``path`` itself for a run): the folder whose run.json says where its
    relative --data path pointed and what the data held. A folder moved onto its source's
    name names itself: the walk stops at a folder seen before."""
    path, seen = Path(path), set()
    while is_inference_dir(path) and path.resolve() not in seen:
        seen.add(path.resolve())
        path = Path(read_manifest(path)["source"]["path"])
    return path


def check_source(path) -> None:
    """Refuse what is no run or quantized/pruned folder by what it holds, before the source
    loads and before --out is checked (`check_target`): a folder lowbit export wrote was refused
    only once an --out in the way had been cleared, as "exists and is not empty"."""
    check_given(path, "RUN_DIR")
    path = Path(path)
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "no such folder"
        raise UsageError(
            f"{path}: {what}; fix: give a run folder (lowbit train --out) or a "
            "folder written by lowbit quantize/prune"
        )
    if (path / EXPORT_INFO).is_file() and not is_inference_dir(path):
        raise UsageError(
            f"{path}: a Hugging Face folder that lowbit export wrote, not a run or a "
            f"quantized/pruned folder; fix: give the folder it was exported from, "
            f"{exported_from(path) or f'as its {EXPORT_INFO} would say (unreadable)'}"
        )
    if is_inference_dir(path) and not (path / "config.yaml").is_file():  # else: "not a run"
        raise UsageError(
            f"{path}: a quantized/pruned folder without its config.yaml (the source run's "
            f"settings); fix: copy config.yaml back from {read_manifest(path)['source']['path']}"
        )


def load_source(path, device: str | torch.device = "cpu", checkpoint_path=None) -> Source:
    """A training run (weights of its checkpoint in fp32: its master weights where the recipe
    keeps them) or an inference folder, on ``device`` (``auto``, ``cpu``, ``cuda[:N]``: a one-line
    error for a device that is not here)."""
    from safetensors.torch import load_file

    from lowbit.train import checkpoint
    from lowbit.train.config import read, resolve, with_recorded_data
    from lowbit.train.evaluate import check_has_checkpoint
    from lowbit.train.tasks import build_task
    from lowbit.train.trainer import progress_bars_off, resolve_device

    check_source(path)
    device = resolve_device(str(device))
    path = Path(path)
    config = resolve(read(path))
    config = replace(config, device=str(device))
    # the data as the (source) run read it, whatever the current folder
    config = with_recorded_data(training_run(path), config)
    if is_inference_dir(path):
        if checkpoint_path:
            raise UsageError(f"{path} is a quantized/pruned folder; fix: drop --checkpoint")
        manifest = read_manifest(path)
        again = f"fix: write it again from {manifest['source']['path']} (lowbit quantize/prune)"
        check_folder_files(path, manifest.get("run_files"), config, again)  # before the build
        with progress_bars_off(True):  # transformers' "Loading weights" bar
            task = build_task(config, run_dir=path)
        model = task.model
        q = manifest.get("quantization")
        if q:
            from lowbit.infer.model import shell_model
            from lowbit.infer.quant import QuantRecipe

            shell_model(model, QuantRecipe.from_dict(q), manifest["layers"])
        weights = path / WEIGHTS
        if not weights.is_file():
            raise UsageError(f"{path}: no {WEIGHTS}; fix: quantize or prune again")
        try:
            state = load_file(weights)
        except Exception as error:  # torn or foreign bytes fail in safetensors' header reader
            raise UsageError(f"{weights}: unreadable ({_one_line(error)}); {again}") from None
        # a tied tensor stored once under its first name (`_write`); a folder from before that
        # holds a copy under each name, which loads as it is
        state.update(
            {n: state[f] for n, f in tied_names(model).items() if n not in state and f in state}
        )
        try:
            model.load_state_dict(state, strict=True)
            _check_code_dtypes(model, state)
        except RuntimeError as error:  # another folder's file: missing, extra or reshaped tensors
            raise UsageError(
                f"{weights}: its tensors do not fit the layers {MANIFEST} names "
                f"({_one_line(error)}); {again}"
            ) from None
        check_crc32(weights, manifest.get("crc32"), again)  # the tensors fit: are they its?
        # rebuilt from the source run's --model folder, as the run itself is (below)
        checkpoint.check_model_folder(training_run(path))
        model.to(device).eval()
        step = int(manifest["source"]["step"])
        original = f"fp32 weights ({describe_manifest(manifest)})"  # the model as loaded
        return Source(path, config, task, model, manifest, None, step, None, original)
    # a run killed before its first save is told so, with the command that starts it again
    check_has_checkpoint(path, checkpoint_path, config)
    found = checkpoint.find(path, checkpoint_path)
    state = checkpoint.load(found)
    with progress_bars_off(True):  # transformers' "Loading weights" bar
        task = build_task(config, run_dir=path)
    model = task.model.float()
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as error:  # the run's --model folder holds another architecture now
        raise UsageError(
            f"{found}: its weights do not fit the model {config.model} builds now "
            f"({_one_line(error)}); fix: restore {config.model} as the run trained from it"
        ) from None
    # weights that fit may still be loaded into another model (another rope_theta, hidden_act):
    # the folder's config is checked against the one the run recorded
    checkpoint.check_model_folder(path)
    masters = _load_master_weights(model, state, config, found)
    sizes = _original_sizes(state["model"], model, masters)
    original = "fp32 master weights" if masters else f"{_dtype_names(state['model'])} weights"
    model.to(device).eval()
    return Source(path, config, task, model, None, found, int(state["step"]), sizes, original)


# The dtypes a tensor may be converted between as it loads: values, not another format's codes.
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_code_dtypes(model: torch.nn.Module, state: dict) -> None:
    """A RuntimeError naming the first tensor of ``state`` whose dtype is not its layer's where
    either is a format's codes (int8, packed uint8, float8): ``load_state_dict`` converts dtypes
    and checks only shapes, so int8 codes loaded into an fp8 layer of the same shape became
    fp8 values, evaluated under the fp8 name."""
    for name, tensor in model.state_dict().items():
        stored = state.get(name)
        if stored is None or stored.dtype == tensor.dtype:
            continue
        if stored.dtype not in _FLOAT_DTYPES or tensor.dtype not in _FLOAT_DTYPES:
            raise RuntimeError(
                f"{name} is {str(stored.dtype).removeprefix('torch.')} in the file, "
                f"{str(tensor.dtype).removeprefix('torch.')} in the layer"
            )


def _original_sizes(tensors: dict, model: torch.nn.Module, masters: list) -> dict[str, int]:
    """Bytes of each tensor of a checkpoint's model state, as quantize and prune start from it:
    in the dtype the run stored it (bf16 for bf16-pure, though ``model`` is fp32), and fp32 for
    a parameter given its master weights. A tied tensor (GPT-2's head and embedding) counts once,
    as the checkpoint stores it, under its first name, which `named_parameters` gives it too."""
    sizes, seen = {}, set()
    for name, tensor in tensors.items():
        key = torch.is_tensor(tensor) and (tensor.data_ptr(), tuple(tensor.shape))
        if key and key not in seen:
            seen.add(key)
            sizes[name] = tensor.nbytes
    master_ids = {id(p) for p in masters}
    sizes.update({n: p.nbytes for n, p in model.named_parameters() if id(p) in master_ids})
    return sizes


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Each name of ``model``'s state that is a tensor an earlier name holds too (a head tied to
    its embedding: ``lm_head.weight`` -> ``model.embed_tokens.weight``), with that first name."""
    first, tied = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in first:
            tied[name] = first[key]
        first.setdefault(key, name)
    return tied


def _dtype_names(tensors: dict) -> str:
    """The floating dtypes of a checkpoint's weights as recipes name them (``bf16``,
    ``bf16/fp32`` where some layers were kept in fp32)."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    dtypes = {t.dtype for t in tensors.values() if torch.is_tensor(t) and t.is_floating_point()}
    return "/".join(sorted(names.get(dtype, str(dtype)) for dtype in dtypes))


def _load_master_weights(
    model: torch.nn.Module, state: dict, config, found: Path
) -> list[torch.nn.Parameter]:
    """Give ``model`` the fp32 master weights that a run of a recipe with them (``bf16-low``,
    ``fp16-low``) keeps in its checkpoint's precision state: the optimizer steps those, and the
    16-bit parameters are only their rounding, so the masters are the run's weights (what
    DeepSpeed's ``zero_to_fp32`` exports). The state keys each master by its parameter's position
    among the optimizer's parameters, in the order the trainer's `build_optimizer` gives them.
    Returns the parameters given their masters."""
    masters = state.get("precision", {}).get("update", {}).get("masters")
    if not masters:
        return []
    params = _in_optimizer_order(model, config)
    for index, master in masters.items():
        if index >= len(params) or params[index].shape != master.shape:
            raise UsageError(
                f"{found}: its master weights do not fit the parameters of {config.model} "
                f"(entry {index}); fix: give a checkpoint that this lowbit version wrote"
            )
    with torch.no_grad():
        for index, master in masters.items():
            params[index].copy_(master)
    return [params[index] for index in masters]


def _in_optimizer_order(model: torch.nn.Module, config) -> list[torch.Tensor]:
    """``model``'s parameters in the order of the trainer's optimizer, which `build_optimizer`
    takes from the *converted* model: a converted mixture-of-experts layer registers its
    parameters in its own order (`LowbitExperts`: the expert matrices before gpt-oss's biases), so
    the unconverted model's order would pair masters with other parameters. The order is read
    from a copy converted on the meta device (no memory, and ``model`` stays as it is), by name."""
    from lowbit.precision import Precision
    from lowbit.precision.update import optimizer_params
    from lowbit.train.trainer import build_optimizer, recipe_of

    on_meta = {
        id(p): torch.nn.Parameter(p.detach().to("meta"), p.requires_grad)
        for p in model.parameters()
    }
    shadow = Precision(recipe_of(config), device=config.device).convert(
        copy.deepcopy(model, memo=on_meta)
    )
    names = {id(p): name for name, p in shadow.named_parameters()}
    own = dict(model.named_parameters())
    return [own[names[id(p)]] for p in optimizer_params(build_optimizer(shadow, config))]


def _one_line(error: Exception, limit: int = 240) -> str:
    """The gist of a library's error in one line: its first line, or for `load_state_dict`'s the
    first below its "Error(s) in loading state_dict" heading (a missing, extra or reshaped
    tensor)."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    return lines[0][:limit] if lines else type(error).__name__


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def tensor_bytes_of(weights: Path) -> int:
    """Bytes of the tensors a safetensors file stores: its size less its header (the 8-byte
    length and the JSON of names, dtypes, shapes and metadata: 696 of the 8,328 bytes of the
    digits CNN's int8 file), the measure a checkpoint's sizes are in (`source_bytes`), so that
    the two compare. A file too short for the header it announces is refused in one line."""
    size = weights.stat().st_size
    with open(weights, "rb") as file:
        header = int.from_bytes(file.read(8), "little")
    if size < 8 or header > size - 8:  # empty, cut short, or no safetensors file at all
        why = (
            f"{size} bytes, short of the 8 that give its header's length"
            if size < 8
            else f"a header of {header:,} bytes announced in a file of {size:,}"
        )
        raise UsageError(
            f"{weights}: unreadable ({why}); fix: write it again (lowbit quantize/prune)"
        )
    return size - 8 - header


def source_bytes(source: Source) -> int:
    """Bytes of the tensors quantize or prune start from (`Source.original_sizes`: the
    checkpoint's dtype, bf16 for bf16-pure though `load_source` gives the model in fp32, and fp32
    for a parameter given its fp32 master weights; a tied tensor once), or those of an inference
    folder's file (`tensor_bytes_of`)."""
    if source.manifest is not None:
        return tensor_bytes_of(source.path / WEIGHTS)
    return sum(source.original_sizes.values())


def default_out(path, suffix: str) -> Path:
    """The sibling ``<folder>-<suffix>`` of ``path``; ``.`` and ``run/..`` name no folder by
    themselves, so their absolute form is used."""
    path = Path(path)
    if path.name in ("", ".."):
        path = Path(os.path.abspath(path))
    return path.with_name(f"{path.name}-{suffix}")


def _check_out(out: Path, force: bool) -> None:
    """Refuse an ``--out`` of a quantize/prune/export that holds something other than what an
    earlier inference folder or export wrote there (that only with ``force``). A training run's
    folder is refused even with ``force``: its checkpoints are no artifact to replace."""
    if out.is_symlink() and not out.exists():  # renaming the finished folder onto it fails
        raise UsageError(
            f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist; fix: "
            "create that folder, or choose another --out"
        )
    blocking = file_in_the_way(out)
    if blocking == out:
        raise UsageError(f"{out}: exists and is not a folder; fix: choose another --out")
    if blocking is not None:
        raise UsageError(
            f"--out {out}: {blocking} is a file, not a folder; fix: choose another --out"
        )
    if not out.exists() or not [p for p in out.iterdir() if not _is_partial(p, out)]:
        return
    previous = next((p for p in out.iterdir() if _is_previous(p, out)), None)
    if previous is not None:  # an earlier --force stopped while replacing the folder's files
        raise UsageError(
            f"{out}: {previous.name} holds the files of the folder an interrupted --force was "
            f"replacing; fix: move them back into {out} (or delete {previous}), then run again"
        )
    if (out / "run.json").is_file() or (out / "checkpoints").is_dir():
        raise UsageError(f"{out} holds a training run; fix: choose another --out")
    # files of the names a folder or export writes (config.yaml, a Hugging Face model's) beside
    # neither manifest are the user's own: --force replaces only what lowbit wrote
    described = any((out / name).is_file() for name in MANIFESTS)
    shards = sorted(p.name for p in out.iterdir() if _SHARD.fullmatch(p.name))
    foreign = [] if described else [n for n in _ARTIFACTS if (out / n).exists()] + shards
    if foreign:
        raise UsageError(
            f"{out} holds {', '.join(foreign)} that no lowbit quantize, prune or export wrote "
            f"(no {MANIFEST} or {EXPORT_INFO} beside it); fix: choose another --out"
        )
    if not force:
        raise UsageError(
            f"{out} exists and is not empty; fix: remove it, choose another --out, or pass --force"
        )


def listing(out: Path, manifest: str) -> list[str]:
    """Every name in the finished folder ``out`` and its ``manifest``, about to be written: the
    ``files`` an inference folder or export records, and exactly what a later --force replaces
    (`_artifacts`)."""
    return sorted({*(item.name for item in out.iterdir()), manifest})


def _artifacts(out: Path) -> list[Path]:
    """What an earlier inference folder or export wrote into ``out``, its manifests first: moved
    away in this order, a folder never looks complete while its weights are gone. Both manifests
    go, so that no description outlives the weights it described; besides them, the files its
    manifest lists (`listing`), never a name the folder did not write (a user's config.json beside
    a quantized folder). A folder from before the lists: a quantized or pruned one's
    `_FOLDER_WROTE`, an export's `_ARTIFACTS` and the tokenizer files and weight shards its
    `EXPORT_INFO` and index name; a file ``model-N-of-M.safetensors`` that neither names is the
    user's: taken for a shard by its name alone, it was moved away and deleted."""
    names = list(MANIFESTS)
    if (out / MANIFEST).is_file():
        files = _read_dict(out / MANIFEST).get("files")
        names += _entries(files) if isinstance(files, list) else _FOLDER_WROTE
    if (out / EXPORT_INFO).is_file():
        info = _read_dict(out / EXPORT_INFO)
        if isinstance(info.get("files"), list):
            names += _entries(info["files"])
        else:
            names += [*_ARTIFACTS, *_entries(info.get("tokenizer_files")), *_indexed_shards(out)]
    names = sorted(dict.fromkeys(names), key=lambda name: name not in MANIFESTS)
    return [out / name for name in names if (out / name).exists()]


def _read_dict(file: Path) -> dict:
    """The JSON object in ``file`` (a manifest); empty where it is unreadable or no object."""
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _indexed_shards(out: Path) -> list[str]:
    """The weight shards transformers' index in ``out`` names (its ``weight_map``'s files)."""
    try:
        index = json.loads((out / INDEX).read_text(encoding="utf-8"))
        files = list(index["weight_map"].values())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []
    return _entries(files)


def _entries(names) -> list[str]:
    """The names of entries of a folder itself in a list read from one of its files: a list
    edited by hand to name ``../x`` or ``/x`` must not make ``--force`` move away a file outside
    it (nor a number in it be a traceback)."""
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and n not in ("", ".", "..") and "/" not in n]


def _hidden(out: Path, kind: str) -> str:
    """The start of the name of a hidden folder kept for ``out`` (``.<name>.partial-``,
    ``.<name>.previous-``). A name near the filesystem's 255-byte limit, itself a valid --out,
    would make that name too long to create: it is cut, and a digest of the whole name keeps
    two such names from sharing their hidden folders. The name is the absolute path's: ``.`` or
    ``run/..`` names no folder by itself, and an interrupted ``--force`` into ``q`` must be found
    again by one given ``--out .`` from inside it."""
    name = Path(os.path.abspath(out)).name
    if len(name.encode()) > 200:
        digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
        name = f"{name.encode()[:180].decode(errors='ignore')}~{digest}"
    return f".{name}.{kind}-"


def _is_previous(item: Path, out: Path) -> bool:
    """A hidden folder `_move_in` keeps an earlier folder's files in while replacing them."""
    return item.name.startswith(_hidden(out, "previous")) and item.is_dir()


def _move_in(staging: Path, out: Path) -> None:
    """Move what ``staging`` holds into the existing ``out`` in place of an earlier folder's files
    (`_artifacts`), the manifest last. The earlier files are first moved into a hidden folder in
    ``out``, and back when a move fails or is interrupted (Ctrl-C), so ``out`` then holds the
    earlier folder as it was; where moving them back fails too, the error names the hidden
    folder, and the next quantize/prune/export into ``out`` refuses until it is dealt with
    (`_check_out`): the earlier files are never deleted before the new ones are all in."""
    previous = Path(tempfile.mkdtemp(prefix=_hidden(out, "previous"), dir=out))
    # a file that is none of the earlier folder's but has a name the new one writes (a user's
    # tokenizer.json beside a quantized folder, which an export writes) is replaced as well:
    # kept aside with the rest, so that a failure puts it back too
    earlier = {item.name: item for item in _artifacts(out)}
    earlier.update({i.name: out / i.name for i in staging.iterdir() if (out / i.name).exists()})
    moved_in = []
    try:
        for item in earlier.values():
            os.replace(item, previous / item.name)
        for item in sorted(staging.iterdir(), key=lambda item: item.name in MANIFESTS):
            os.replace(item, out / item.name)
            moved_in.append(item.name)
    except BaseException as error:
        try:
            for name in reversed(moved_in):
                os.replace(out / name, staging / name)
            for item in sorted(previous.iterdir(), key=lambda item: item.name in MANIFESTS):
                os.replace(item, out / item.name)
            previous.rmdir()
        except BaseException:
            raise UsageError(
                f"{out}: replacing its files stopped ({_one_line(error)}) and the earlier files "
                f"could not be moved back; they are in {previous}; fix: move them back into {out}"
            ) from error
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _is_partial(item: Path, out: Path) -> bool:
    """A hidden folder `staged_out` writes ``out`` into (left behind by a process killed hard)."""
    return item.name.startswith(_hidden(out, "partial")) and item.is_dir()


# A hidden folder `staged_out` writes into, unchanged this long where no lock tells whether its
# writer lives (NFS), is taken for one a killed process left: a live writer adds to it or grows a
# file in it at least every few minutes (a model's file is written as it is saved).
STALE_PARTIAL_SECONDS = 3600


def _age(folder: Path) -> float:
    """Seconds since ``folder`` or anything in it last changed (0 for a folder gone meanwhile)."""
    newest = 0.0
    for item in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):
            newest = max(newest, item.lstat().st_mtime)
    return time.time() - newest if newest else 0.0


@contextlib.contextmanager
def staged_out(out, force: bool):
    """A hidden folder to write an inference folder or export into, moved into ``out`` when the
    writing is done: a write that fails or is interrupted (a full disk, Ctrl-C) leaves ``out`` as
    it was, and with ``force`` the earlier folder there is replaced only then. A new ``out`` is a
    sibling's one rename; an existing one holds the hidden folder itself (its parent may be a
    folder the user cannot write to, or another filesystem when ``out`` is a mount point) and
    takes its files one by one, the manifest last (what makes a folder an inference folder or
    export), the earlier folder's files kept aside until they are all in (`_move_in`).

    A hidden folder of ``out``'s left by a process killed hard is removed first: one no process
    holds the lock on, or where the filesystem has no such locks (NFS), one unchanged for
    `STALE_PARTIAL_SECONDS` (an hour), so that two steps into one --out leave each other's alone.
    A step whose hidden folder was deleted all the same ends in one line, not a traceback."""
    out = Path(out)
    _check_out(out, force)
    holder = out if out.is_dir() else out.parent
    check_writable(out)  # /proc's ENOENT was a traceback, a hidden name the user never gave
    holder.mkdir(parents=True, exist_ok=True)
    for stale in (p for p in holder.iterdir() if _is_partial(p, out)):
        held = lock_folder(stale)  # False: another quantize/prune/export still writes into it
        if held is False or (held is None and _age(stale) < STALE_PARTIAL_SECONDS):
            continue
        shutil.rmtree(stale, ignore_errors=True)
        if held is not None:
            os.close(held)
    staging = Path(tempfile.mkdtemp(prefix=_hidden(out, "partial"), dir=holder))
    held = lock_folder(staging)
    try:
        yield staging
        _umask_modes(staging)
        # another step into the same --out may have finished meanwhile: its folder is kept as
        # an earlier one is (a rename onto it was an OSError traceback, or replaced it unasked)
        _check_out(out, force)
        if not out.exists():
            os.replace(staging, out)
            return
        _move_in(staging, out)
    except Exception as error:
        if staging.is_dir():
            raise
        raise UsageError(
            f"{out}: the hidden folder {staging.name} this step was writing into was deleted "
            f"meanwhile ({_one_line(error)}); fix: run it again, one step at a time into {out}"
        ) from error
    finally:
        if held is not None and held is not False:  # (False is an int: os.close(False) is fd 0)
            os.close(held)
        shutil.rmtree(staging, ignore_errors=True)


def _umask_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir``/``open`` gives under the
    process's umask (0755/0644 under the usual 022): `tempfile.mkdtemp` makes the staging folder
    0700 and safetensors writes its file 0600, which would leave a folder moved into ``--out``
    unreadable to the group and others who can read the run it came from."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [folder, *folder.rglob("*")]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


# Folders of a source that a step reads or a run writes into: an --out inside one is refused.
_SOURCE_FOLDERS = (*_COPIED, "checkpoints")


def check_outside(out: Path, source: Path) -> None:
    """Refuse an ``--out`` that is the source folder (--force would delete what the step reads)
    or lies inside one of its folders the step reads or the run writes (`_SOURCE_FOLDERS`): one
    written into the tokenizer/ it copies was copied into itself without end (a traceback), and
    one written into the run's checkpoints/ became part of the run. Elsewhere inside the source
    (``RUN/int8``) is a place to keep it. A pruned source's training run (`training_run`) is
    checked too: a folder written into its checkpoints/ (``step-0000099.dcp``) was taken for its
    newest checkpoint, and ``lowbit eval RUN`` failed on it."""
    out, source = Path(out), Path(source)
    if out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the source folder; fix: choose another folder")
    for folder in dict.fromkeys([source, training_run(source)]):
        for name in _SOURCE_FOLDERS:
            inner = (folder / name).resolve()
            if out.resolve() == inner or inner in out.resolve().parents:
                where = (
                    f"the source folder's {name}"
                    if folder == source
                    else f"{name}/ of {folder}, the run the source came from"
                )
                raise UsageError(f"--out {out} is inside {where}; fix: choose a folder outside it")


def check_target(out, source_path, force: bool) -> None:
    """The refusals of an ``--out`` that need no model (`check_outside`, `_check_out`), made
    before the source loads: they came after the model was loaded and quantized or pruned,
    minutes for a large one. Writing makes them again (`save`, `staged_out`): the folder may
    have changed meanwhile."""
    check_source(source_path)
    check_outside(Path(out), Path(source_path))
    _check_out(Path(out), force)
    check_writable(out)


def save(source: Source, model: torch.nn.Module, manifest: dict, out, force: bool = False) -> Path:
    """Write an inference folder for ``model`` (derived from ``source``) to ``out``; records the
    bytes of the source's tensors and of those the written ``model.safetensors`` holds (its
    header left out on both sides: `tensor_bytes_of`) in ``bytes``."""
    final = Path(out)
    check_outside(final, source.path)
    with staged_out(final, force) as out:
        _write(source, model, manifest, out)
    return final


def _write(source: Source, model: torch.nn.Module, manifest: dict, out: Path) -> None:
    """The files of an inference folder, written into the empty folder ``out``."""
    from safetensors.torch import save_file

    from lowbit.train.checkpoint import run_files_record

    original = source_bytes(source)
    for name in _COPIED:
        item = source.path / name
        if item.is_dir():
            shutil.copytree(item, out / name, dirs_exist_ok=True)
        elif item.is_file():
            shutil.copy2(item, out / name)
    _record_paths(source.path, out)
    # a tied tensor (a head that is its embedding) is stored once, as the checkpoint stores it:
    # a copy under each name made a pruned folder larger than its source by the embedding
    tied = tied_names(model)
    tensors = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if name not in tied
    }
    save_file(tensors, out / WEIGHTS, metadata={"lowbit": json.dumps(manifest.get("quantization"))})
    manifest = {
        **manifest,
        "version": VERSION,
        "bytes": {"original": original, "quantized": tensor_bytes_of(out / WEIGHTS)},
        "crc32": file_crc32(out / WEIGHTS),  # what `load_source` checks the file against
        # the copied tokenizer, tags its task reads: `check_folder_files`
        "run_files": run_files_record(out, source.config),
        "files": listing(out, MANIFEST),  # what a later --force replaces, and nothing else
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def file_crc32(path: Path) -> str:
    """The CRC-32 of the file's bytes, as 8 hex digits. Read into one reused 256 KiB buffer, which
    stays in the CPU's cache between the read and the CRC: 0.41 s of CPU per GiB against 0.46 s
    for a fresh 1 MiB piece each read (session 43, a cached 1 GiB file, 2-core Intel Xeon);
    larger pieces were slower (0.79 s at 8 MiB), binascii's crc32 the same, mmap slower (0.55
    s). A second pass over the file it is, though: safetensors maps it, and reads it only as the
    model copies the tensors in, which a CRC thread beside the model's build did not speed up on
    2 busy cores."""
    crc = 0
    buffer = bytearray(1 << 18)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while size := file.readinto(buffer):
            crc = zlib.crc32(view[:size], crc)
    return f"{crc:08x}"


class ChangedBytes(UsageError):
    """A folder's file whose bytes no longer match what its manifest records: its
    ``model.safetensors``'s CRC-32 (`check_crc32`), its tokenizer's or tags' sha256
    (`check_folder_files`)."""


def check_crc32(weights: Path, recorded, again: str) -> None:
    """Refuse ``weights`` whose bytes no longer match the CRC-32 that `_write` recorded in the
    manifest (``recorded``; a folder from before session 42 has none and is not checked), as a
    checkpoint is refused (`lowbit.train.checkpoint.read_file`): safetensors checks only its
    header, so a tensor whose bytes changed on the disk (a bit flipped, bytes overwritten)
    loaded, and was evaluated, generated from or exported, without a word."""
    if recorded is not None and file_crc32(weights) != recorded:
        raise ChangedBytes(
            f"{weights}: its bytes changed since it was written (their CRC-32 no longer matches "
            f"the one {MANIFEST} records); {again}"
        )


def check_folder_files(path: Path, recorded, config, again: str) -> None:
    """Refuse the inference folder ``path`` where the tokenizer, tags or word vocabulary `_write`
    copied into it, those its task (of ``config``) reads, changed since (``recorded``: their
    sha256, `checkpoint.run_files_record`; a
    folder from before session 42 has none and is not checked): one of another size was blamed
    on its model.safetensors (its tensors did not fit), one of the same size was read on other
    token or tag ids without a word."""
    from lowbit.train.checkpoint import first_changes, run_files_changed

    changes = run_files_changed(path, recorded, config)
    if changes:
        raise ChangedBytes(
            f"{path}: its tokenizer, tags or vocabulary changed since it was written "
            f"({first_changes(changes)}), "
            f"so its model would read other token or tag ids; {again}"
        )


def _record_paths(source_path: Path, out: Path) -> None:
    """Write the config.yaml copied into ``out`` again with the absolute ``--data`` and
    ``--model`` paths the training run recorded in place of relative ones (`with_recorded_data`):
    a relative path names a file from the folder the run was started in, which only the run's
    run.json tells, and with the run moved or deleted the folder read it from the current folder
    ("text.txt: no such file", a path the user never gave `lowbit eval`)."""
    from lowbit.train.config import read, with_recorded_data, write

    config = read(source_path)
    recorded = with_recorded_data(training_run(source_path), config)
    if recorded != config:
        write(recorded, out)


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of the model's state (every tensor's name, dtype, shape and bytes): what tells a
    source that still holds the weights an inference folder was made from from one trained or
    pruned again in the same place (``lowbit train --overwrite``, ``lowbit prune --force``)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {data.dtype} {tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


def source_record(source: Source) -> dict:
    """Where an inference folder's model comes from. Call it before changing ``source.model``:
    it records the digest of the weights as loaded, which the folder's evaluation checks its
    reference against."""
    record = {"path": str(source.path.resolve()), "step": source.step, "original": source.original}
    if source.checkpoint is not None:
        record["checkpoint"] = str(source.checkpoint.resolve())
    record["weights"] = weights_digest(source.model)
    return record


def load_baseline(manifest: dict, device="cpu") -> tuple[Source | None, str | None]:
    """The model an inference folder was made from (a run, or the folder it quantized), if it is
    still there and still holds those weights: the reference its metric change is measured
    against; else None and why, in words."""
    from lowbit.train.checkpoint import is_checkpoint

    src = manifest["source"]  # `read_manifest` checked its path
    path = Path(src["path"])
    checkpoint = src.get("checkpoint")
    if not path.is_dir():  # moved or deleted: which, nothing here can tell
        return None, (
            f"the source {'run' if checkpoint else 'folder'} {path} that {MANIFEST} records is "
            "not there, moved or deleted; to compare against it, move it back there"
        )
    if checkpoint and not is_checkpoint(checkpoint):
        return None, (
            f"the source checkpoint {checkpoint} is gone; a resumed run keeps only its last "
            "--keep-last checkpoints"
        )
    if not checkpoint and not is_inference_dir(path):  # an export or another folder there now
        return None, (
            f"the source {path} is no longer a quantized/pruned folder (replaced since, e.g. by "
            "lowbit export --force)"
        )
    try:
        baseline = load_source(path, device, checkpoint if checkpoint else None)
    except UsageError as error:  # its bytes changed, cut short, its tokenizer damaged, ...:
        # this folder's metrics still show (only a changed CRC-32 did before review R7)
        problem, _, fix = str(error).partition("; fix: ")
        return None, f"{problem}; to compare against it, {fix}" if fix else problem
    recorded = src.get("weights")  # folders written before lowbit recorded it have none
    changed = recorded is not None and recorded != weights_digest(baseline.model)
    if changed and not _made_from_rounded_weights(baseline, recorded):
        return None, (
            f"the source {checkpoint or path} holds other weights than when this folder was made "
            "(trained or pruned again in its place)"
        )
    return baseline, None


def _made_from_rounded_weights(baseline: Source, recorded: str) -> bool:
    """Whether ``recorded`` is the digest of the 16-bit parameters of the baseline's checkpoint
    (in fp32), which then become its model's weights: a folder quantized or pruned from a
    ``bf16-low``/``fp16-low`` run before `load_source` read the fp32 master weights was made from
    those parameters and recorded their digest, so they are its reference (the baseline is
    discarded when they are not)."""
    from lowbit.train import checkpoint

    if baseline.checkpoint is None:  # an inference folder holds one set of weights
        return False
    baseline.model.load_state_dict(checkpoint.load(baseline.checkpoint)["model"])
    return weights_digest(baseline.model) == recorded
