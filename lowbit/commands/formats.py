"""`lowbit formats`: the table of number formats, or their error on a user's tensors."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import warnings
from pathlib import Path

import torch

from lowbit.errors import UsageError
from lowbit.formats import FloatFormat, IntFormat, cast, get, names, quantize
from lowbit.formats.cast import converts_to_fp32
from lowbit.formats.error import sqnr
from lowbit.models.pretrained import weight_files
from lowbit.models.torch_file import torch_file_problem

NAME = "formats"
HELP = "Print every number format, or the quantization error of each on a tensor or checkpoint."

# (format, granularity, block_size) combinations measured with --tensor, the ones recipes use.
# bf16 and fp16 have no granularity: recipes cast those operands without a scale
# (`lowbit.nn.operand.plain_cast`), so a bf16 tensor loses nothing in bf16 and fp16's range shows;
# scaled by amax / max, a bf16 checkpoint would show a 56 dB loss and 1e-39 would fit in fp16.
SCHEMES = [
    ("bf16", None, None),
    ("fp16", None, None),
    ("fp8_e4m3", "tensor", None),
    ("fp8_e4m3", "axis", None),
    ("fp8_e4m3", "block", 128),
    ("fp8_e5m2", "tensor", None),
    ("fp8_e4m3", "mx", None),
    ("fp6_e2m3", "mx", None),
    ("fp6_e3m2", "mx", None),
    ("fp4_e2m1", "mx", None),
    ("fp4_e2m1", "nvfp4", None),
    ("int8", "axis", None),
    ("int4", "block", 32),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names",
        nargs="*",
        metavar="FORMAT",
        help="only these formats (e.g. fp8_e4m3 fp4_e2m1): their rows of the table, or with "
        "--tensor their columns",
    )
    parser.add_argument(
        "--tensor",
        metavar="FILE",
        help="a .pt, .safetensors, .npy or .npz file, a Hugging Face model folder (its .safetensors or "
        "pytorch_model.bin files), or a lowbit checkpoint "
        "or run folder (the model of its latest checkpoint): report the SQNR (dB) of every "
        "format and granularity on each floating-point tensor in it",
    )


def format_table(chosen: list[str] | None = None) -> str:
    """The table of every format, or of the ``chosen`` ones."""
    header = (
        f"{'format':<10}{'bits':>5}{'e':>3}{'m':>3}{'bias':>6}{'max':>13}"
        f"{'min normal':>13}{'min subnorm':>13}{'rel. prec.':>12}  inf/nan"
    )
    lines = [header, "-" * len(header)]
    every = [get(name) for name in names() if chosen is None or name in chosen]
    for fmt in every:
        if isinstance(fmt, FloatFormat):
            e, m, bias = fmt.ebits, fmt.mbits, fmt.bias
            special = f"{'inf' if fmt.has_inf else '-'}/{'nan' if fmt.has_nan else '-'}"
        else:
            e, m, bias, special = "-", "-", "-", "-/-"
        lines.append(
            f"{fmt.name:<10}{fmt.bits:>5}{e:>3}{m:>3}{bias:>6}{fmt.max:>13.6g}"
            f"{fmt.min_normal:>13.6g}{fmt.min_subnormal:>13.6g}{fmt.epsilon:>12.4g}  {special}"
        )
    # what the columns cannot say: a max of 127 read as int8's -128..127, e8m0 as a signed float
    ints = [fmt for fmt in every if isinstance(fmt, IntFormat)]
    if ints:
        lines.append(
            f"{', '.join(f.name for f in ints)}: symmetric, "
            f"{' and '.join(f'-{f.qmax}..{f.qmax}' for f in ints)} (the most negative code is unused)"
        )
    for fmt in every:
        if isinstance(fmt, FloatFormat) and not fmt.signed:
            lines.append(
                f"{fmt.name}: no sign bit, the powers of two 2^{fmt.emin}..2^{fmt.emax} "
                "(MX block scales)"
            )
    return "\n".join(lines)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Floating-point tensors of a .pt/.safetensors file (a tensor, or a nested state dict), of
    every .safetensors file of a folder (a Hugging Face checkpoint, its shards) or, in a folder
    without one, of its ``pytorch_model.bin`` (or the shards its index lists: an older Hugging
    Face checkpoint, which was refused as a folder of nothing to read), or of the model of a
    lowbit checkpoint (its optimizer moments are no weights a format would hold) or of a run
    folder's latest one."""
    if not path.strip():  # Path("") is the current directory
        raise UsageError("--tensor: an empty path; fix: pass a .pt or .safetensors file")
    from lowbit.train import checkpoint
    from lowbit.train.config import is_run_folder

    file = Path(path)
    # a quantize output, or one of its files (its codes and scales read as weights too)
    if (problem := _quantized_folder_problem(file)) is not None:
        raise UsageError(problem)
    shards = sorted(file.glob("*.safetensors")) if file.is_dir() else []
    if file.is_dir() and not shards:
        shards = weight_files(file, "pytorch_model.bin")
        index = file / "pytorch_model.bin.index.json"
        if not shards and index.is_file():  # read as no weights, it was "no .safetensors file"
            raise UsageError(
                f"{index}: no index of shards lowbit can read (JSON with a weight_map naming "
                "the .bin files); fix: pass one of the shards (a pytorch_model-*.bin file), or "
                "write the folder again with save_pretrained"
            )
    run_checkpoint = None if shards else checkpoint.latest(file)
    if run_checkpoint is not None:
        # a run folder, as every other command takes it: its latest checkpoint (the refusal sent
        # the user to the checkpoints folder, which a multi-process run fills with .dcp folders)
        file = run_checkpoint
        print(
            f"lowbit formats: note: measuring {path}'s latest checkpoint, {file}", file=sys.stderr
        )
    if file.suffix == ".dcp" and file.is_dir():  # a multi-process run's checkpoint: a folder
        loaded = checkpoint.load(file)["model"]
    elif file.is_dir():
        if not shards:
            torch_files = sorted(file.glob("*.pt"))  # a run's checkpoints folder, say
            # a multi-process run's checkpoints are folders
            dcp_folders = sorted(d for d in file.glob("*.dcp") if d.is_dir())
            if torch_files:
                fix = f"pass one of its .pt files (the last: {torch_files[-1]})"
            elif dcp_folders:
                fix = f"pass one of its .dcp checkpoints (the last: {dcp_folders[-1]})"
            elif is_run_folder(file):  # the fix below asked for what it already is
                raise UsageError(
                    f"{path}: a lowbit run folder that has saved no checkpoint yet; fix: wait for "
                    "its first if it is still training, else start it again "
                    f"({checkpoint.restart_command(file)})"
                )
            else:
                fix = "pass a .pt or .safetensors file, or a lowbit run folder"
            raise UsageError(
                f"{path}: a folder, with no .safetensors or pytorch_model.bin file in it; fix: {fix}"
            )
        loaded = {}
        for shard in shards:
            state = (_read_safetensors if shard.suffix == ".safetensors" else _read_torch)(shard)
            if not isinstance(state, dict):  # a .bin of something else than a state dict
                state = {shard.name: state}
            for name, tensor in state.items():
                loaded[_unique(name, loaded)] = tensor
        if shards[0].suffix == ".safetensors":
            loaded = _model_order(loaded)
    elif not file.exists():
        raise UsageError(f"{path}: no such file; fix: pass a .pt or .safetensors file")
    elif not file.is_file():
        raise UsageError(
            f"{path}: not a regular file (a device, pipe or socket); fix: save the tensors to a "
            ".pt or .safetensors file and pass that"
        )
    elif file.suffix == ".safetensors":
        loaded = _model_order(_read_safetensors(file))
    elif file.suffix in (".npy", ".npz"):
        loaded = _read_numpy(file)
    else:
        loaded = _read_torch(file)
        if isinstance(loaded, dict) and {"step", "model"} <= loaded.keys():  # lowbit checkpoint
            loaded = loaded["model"]
    found: dict[str, torch.Tensor] = {}
    packed: dict[str, torch.dtype] = {}
    others: set[str] = set()  # what the tensors not measured are, for the error of no row
    skipped: dict[str, str] = {}  # and by name, for the note on an .npz's

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor) and obj.is_nested:
            # a nested tensor (variable-length sequences) has no dense form to measure: each of
            # its tensors is a row, as a list's are (measured whole, it ended in a traceback)
            walk(prefix, list(obj.unbind()))
        elif isinstance(obj, torch.Tensor):
            # a meta tensor has a shape but no values; a sparse one is measured as the dense
            # tensor it stands for (the formats quantize its zeros too)
            if obj.is_floating_point() and obj.numel() > 1 and not obj.is_meta:
                if not converts_to_fp32(obj.dtype):
                    packed[_unique(prefix or "tensor", packed)] = obj.dtype
                    return
                dense = obj if obj.layout is torch.strided else obj.to_dense()
                name = _unique(prefix or "tensor", found)
                found[name] = dense.detach()  # its own dtype: `error_table`
            else:
                kind = "meta" if obj.is_meta else str(obj.dtype).removeprefix("torch.")
                if obj.is_floating_point() and not obj.is_meta:
                    kind += f" of {'one element' if obj.numel() else 'no element'}"
                others.add(kind)
                skipped[_unique(prefix or "tensor", skipped)] = kind
        elif isinstance(obj, np.ndarray):  # a .npy/.npz file's, or saved in a torch file
            try:
                walk(prefix, torch.from_numpy(np.ascontiguousarray(obj)))
            except TypeError:  # a dtype torch has not (object, ml_dtypes' bfloat16, strings)
                others.add(f"numpy {obj.dtype}")
                skipped[_unique(prefix or "tensor", skipped)] = f"numpy {obj.dtype}"
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(obj, list | tuple):
            for index, value in enumerate(obj):
                walk(f"{prefix}.{index}" if prefix else str(index), value)

    import numpy as np

    walk("", loaded)
    if packed:
        if not found:
            raise UsageError(
                f"{path!r}: {_packed_text(packed)}, and no other floating-point tensor; fix: pass "
                "the checkpoint before it was packed (fp32, bf16, fp16 or fp8 tensors)"
            )
        print(f"lowbit formats: note: {_packed_text(packed)}; not measured", file=sys.stderr)
    if skipped and found and file.suffix == ".npz":  # the others measured, these went unsaid
        kinds = ", ".join(sorted(set(skipped.values())))
        print(
            f"lowbit formats: note: {_named(skipped, 'array')} of {kinds}, no floating-point "
            "values of more than one element; not measured",
            file=sys.stderr,
        )
    if not found:
        held = f" (its tensors: {', '.join(sorted(others))})" if others else ""
        if any("complex" in kind for kind in others):
            values = "a complex tensor: save x.real and x.imag apart"
        elif any(kind.startswith("numpy ") for kind in others):  # numpy reads bfloat16 as void
            values = "a numpy array of another dtype: save x.astype(numpy.float32)"
        else:
            values = "an integer tensor of values: save x.float()"
        raise UsageError(
            f"{path!r} holds no floating-point tensor with values and more than one element{held};"
            f" fix: pass a file of floating-point weights or activations ({values})"
        )
    return found


def conv1d_weights(path: str, names) -> set[str]:
    """The names among ``names`` of transformers ``Conv1D`` weights (GPT-2's projections), stored
    in x out and multiplied as their transpose (`LowbitConv1D` quantizes that along in), found by
    building the model of the config.json that describes ``path`` on the meta device (no memory,
    no weights read): the folder's own, that beside a file, or a run's --model folder. Empty where
    none does or transformers cannot build it (said in a note): the tensors are then measured as
    they are stored."""
    folder = _model_folder(Path(path))
    if folder is None:
        return set()
    from transformers import AutoModel

    from lowbit.models.pretrained import load_config
    from lowbit.nn.layer_kinds import is_conv1d

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModel.from_config(load_config(folder))
    except Exception as error:  # any failure of a foreign build: measure the tensors as stored
        problem = next(iter(str(error).splitlines()), "") or type(error).__name__
        if not isinstance(error, UsageError):  # load_config's names the file and a fix already
            problem = f"{folder / 'config.json'}: transformers cannot build its model ({problem})"
        print(
            "lowbit formats: note: Conv1D weights (in x out), if any, are measured as stored, "
            f"along out, not as their GEMM reads them: {problem}",
            file=sys.stderr,
        )
        return set()
    layers = [f"{name}.weight" for name, module in model.named_modules() if is_conv1d(module)]
    return {
        name
        for name in names
        if any(name == layer or name.endswith(f".{layer}") for layer in layers)
    }


def _quantized_folder_problem(given: Path) -> str | None:
    """The refusal of a `lowbit quantize` output folder, or of a file in one: its linear weights
    are integer or fp4 codes beside their scales, so the table measured the scales as if they
    were weights (an int8 folder's rows were ``lm_head.scale`` and the like); None for any other
    path, a pruned folder (float weights) too."""
    from lowbit.infer.io import MANIFEST

    if not given.exists():  # its refusal says so
        return None
    folder = given if given.is_dir() else given.parent
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no manifest: no quantized folder
        return None
    quantization = manifest.get("quantization") if isinstance(manifest, dict) else None
    if not isinstance(quantization, dict):
        return None
    source = manifest.get("source")
    run = source.get("path") if isinstance(source, dict) else None
    fix = f"lowbit formats --tensor {shlex.quote(run)}" if isinstance(run, str) else "pass its run"
    where = f"{given}: a file of" if given != folder else f"{folder}:"
    return (
        f"{where} a lowbit quantize output, whose weights are {quantization.get('format')} "
        f"codes already (beside their scales), not weights a format would quantize; fix: measure "
        f"the run it came from ({fix})"
    )


def _model_folder(path: Path) -> Path | None:
    """The Hugging Face folder whose config.json describes the tensors at ``path`` (see
    `conv1d_weights`), or None."""
    from lowbit.models.pretrained import run_folder_above
    from lowbit.train.config import is_run_folder, read, with_recorded_data

    for folder in (path, path.parent):
        if (folder / "config.json").is_file():
            return folder
    run = path if is_run_folder(path) else run_folder_above(path)
    if run is None:
        return None
    try:  # a relative --model names a folder from where the run was started: run.json's path
        model = Path(with_recorded_data(run, read(run)).model or "")
    except UsageError:
        return None
    return model if (model / "config.json").is_file() else None


def _named(names, noun: str) -> str:
    """``names`` counted and a few of them shown: "4 tensors (a, b, c and 1 more)"."""
    names = list(names)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} {noun}{'s' if len(names) > 1 else ''} ({shown})"


def _packed_text(packed: dict[str, torch.dtype]) -> str:
    """What the skipped tensors of dtypes without an fp32 conversion are, naming a few."""
    dtypes = ", ".join(sorted({str(dtype).removeprefix("torch.") for dtype in packed.values()}))
    return (
        f"{_named(packed, 'tensor')} of packed dtype {dtypes}, "
        "which PyTorch cannot convert to fp32, through which every format quantizes"
    )


def _unique(name: str, taken) -> str:
    """``name``, numbered ``name#2``, ``name#3``... past those in ``taken``: a nested
    ``{"a": {"b": t}}`` and a flat ``"a.b"``, or one name in two .safetensors files of a folder,
    shared a row, and the first tensor vanished from the table without a word."""
    unique, number = name, 1
    while unique in taken:
        number += 1
        unique = f"{name}#{number}"
    return unique


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise UsageError(
            f"{file}: not a safetensors file ({error}); fix: pass a file written by safetensors"
        ) from None


def _read_numpy(file: Path):
    """The array of a .npy file, or the arrays of a .npz archive by name, read without pickle
    (an object array could run code as it is rebuilt)."""
    import numpy as np

    try:
        data = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # torn, foreign or pickled objects
        reason = next(iter(str(error).splitlines()), "") or type(error).__name__
        raise UsageError(
            f"{file}: cannot read it as a numpy file ({reason}); fix: pass a file numpy.save or "
            "numpy.savez wrote of numeric arrays, or a .pt or .safetensors file"
        ) from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            return {name: data[name] for name in data.files}
    return data


def _model_order(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Safetensors tensors sorted with the numbers in their names compared as numbers: a
    safetensors header lists them in string order (``layers.10`` before ``layers.2``), and each
    shard of a folder its own, so that a model's rows came out of its order. (``re.split`` with
    a group alternates text and numbers: two keys never compare a number with text.)"""

    def key(item: tuple[str, torch.Tensor]) -> list[str | int]:
        # by position, not isdigit(), which '²' passes and int() refuses
        parts = re.split(r"(\d+)", item[0])
        return [int(part) if i % 2 else part for i, part in enumerate(parts)]

    return dict(sorted(tensors.items(), key=key))


def _read_torch(file: Path):
    """``torch.load`` with ``weights_only``: unpickling runs no code from the file. numpy arrays
    (of any dtype) are allowed too, because lowbit's checkpoints hold numpy's RNG state, and so
    are lowbit's own spec types (`_spec_types`)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
    numpy_types = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    numpy_types += [getattr(np.dtypes, name) for name in np.dtypes.__all__]
    fix = (
        "fix: pass a .pt file saved with torch.save (tensors, state dicts, lowbit checkpoints) or "
        "a .safetensors file"
    )
    if (problem := torch_file_problem(file, fix)) is not None:
        raise UsageError(f"{file}: {problem}")
    try:
        with (
            torch.serialization.safe_globals(numpy_types + _spec_types()),
            warnings.catch_warnings(),
        ):
            # a legacy file of protocol 3, which it reads, came with two warnings about protocols
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torn or foreign bytes fail in torch's reader or in unpickling
        # torch's text is a page on loading the file unsafely; keep the unpickler's reason
        text = str(error).split("WeightsUnpickler error:")[-1]
        if pickled := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
            # torch.save(model): torch's own fix is to trust the class, which runs its code
            raise UsageError(
                f"{file}: it holds a pickled {pickled[1]} object, which a safe load does not "
                "rebuild (unpickling it could run any code); fix: save its tensors alone, "
                "torch.save(model.state_dict(), path), and pass that"
            ) from None
        reason = next((line.strip() for line in text.splitlines() if line.strip()), "")
        # a torn zip's reason goes on for four sentences about checkpoints being corrupted
        reason = reason.split(". This is an internal miniz error")[0]
        raise UsageError(
            f"{file}: cannot read it as a torch file ({reason or type(error).__name__}); {fix}"
        ) from None


def _spec_types() -> list[type]:
    """The dataclasses and enums of lowbit's recipes and formats: an ``auto`` run's checkpoint
    keeps each layer's `LayerSpec` (its plan) in the precision state, and a load that refuses
    them refuses the checkpoint. They hold data only, rebuilt without running code from the
    file."""
    import dataclasses
    import enum
    import importlib
    import inspect

    # by name: ``lowbit.formats.cast`` is also the name of a function the package exports
    names = ("recipes.recipe", "formats.scaling", "formats.cast", "formats.spec")
    return [
        kind
        for module in (importlib.import_module(f"lowbit.{name}") for name in names)
        for kind in vars(module).values()
        if inspect.isclass(kind)
        and kind.__module__ == module.__name__
        and (issubclass(kind, enum.Enum) or dataclasses.is_dataclass(kind))
    ]


def error_table(
    tensors: dict[str, torch.Tensor], conv1d: set[str] = frozenset(), schemes=SCHEMES
) -> str:
    """The SQNR table, with a note under it for each tensor holding inf or NaN: those entries
    are set to 0 before quantizing (an inf makes its scale inf, or NaN for an MX block, and with
    it every entry the scale covers) and left out of its SQNR. A 4-D tensor whose name ends in
    "weight" (a Conv2d's state-dict key) is read as a Conv2d weight (O x C x kh x kw) and
    quantized as the O x C*kh*kw matrix its GEMM multiplies (`LowbitConv2d`), named in a note:
    along its last axis, kw, a 3x3 kernel's blocks held 3 entries and its SQNR was up to 5 dB
    off training's, either way (the digits CNN's second convolution: int8/axis 52.0 dB, 47.2 as
    trained; fp8_e4m3/mx 28.4, 30.7 as trained). The 2-D tensors named in ``conv1d``
    (`conv1d_weights`: in x out) are quantized transposed, along in, as their GEMM reads them:
    along out, a GPT-2 c_attn weight with one input feature 30x the others read 31.60 dB under
    fp8_e4m3/axis and 43.44 under int8/axis, 43.22 and 35.13 as trained. Any other tensor, an
    N x C x H x W activation too, is quantized along its last axis. Every format quantizes through fp32 (as PyTorch's own
    casts to fp8 do), so a float64 tensor is measured as its fp32 rounding, and its values beyond
    fp32's range, which become inf there, are noted as such rather than as inf or NaN, and so are
    those below it, which become 0."""
    labels = [f"{f}/{g or 'cast'}{'' if b is None else b}" for f, g, b in schemes]
    width = max(12, *(len(name) for name in tensors)) + 2
    lines = [f"{'tensor':<{width}}" + "".join(f"{label:>18}" for label in labels)]
    notes, convolutions, transposed = [], [], []
    for name, given in tensors.items():
        tensor = given.float()
        finite = tensor.isfinite()
        count = tensor.numel() - int(finite.sum())
        # only float64 has values beyond fp32's range (and fp8 dtypes no isfinite on the CPU)
        overflowed = int((~finite & given.isfinite()).sum()) if given.dtype == torch.float64 else 0
        if count:
            notes.append(_non_finite_note(name, tensor.numel(), count, overflowed))
        if given.dtype == torch.float64 and (lost := int(((tensor == 0) & (given != 0)).sum())):
            # flushed to 0 in fp32, they measured as exact: an all-tiny tensor read inf everywhere
            notes.append(
                f"note: {name}: {lost} of {tensor.numel()} entries round to 0 in fp32 (|x| <= "
                f"{2.0**-150:.4g}), through which every format quantizes, and count as 0 in its "
                "SQNR; fix: scale the tensor into fp32's range (e.g. divide it by its largest |x|)"
            )
        if count == tensor.numel():
            continue
        if count:
            tensor = tensor.where(finite, 0)
        cells = []
        if tensor.dim() == 4 and name.endswith("weight"):  # a Conv2d's: as its GEMM reads it
            tensor = tensor.reshape(tensor.shape[0], -1)
            convolutions.append(name)
        elif tensor.dim() == 2 and name in conv1d:  # a Conv1D's, in x out: as its GEMM reads it
            tensor = tensor.t()
            transposed.append(name)
        for fmt, granularity, block in schemes:
            if granularity is None:  # saturating at max where a recipe's cast overflows to inf
                approximation = cast(tensor, fmt)
            else:
                approximation = quantize(tensor, fmt, granularity, block_size=block).dequantize()
            # over the whole tensor: its zeroed entries quantize to 0 and add nothing to either
            # sum, and picking the finite ones out with a mask took ten times the quantization
            cells.append(f"{sqnr(tensor, approximation):>18.2f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    title = "SQNR in dB (higher is better; quantized along the last axis)"
    if convolutions:
        notes.insert(
            0,
            f"note: {', '.join(convolutions)}: 4-D weights, measured as Conv2d weights, the "
            "O x C*kh*kw matrix their GEMM multiplies (quantized along C*kh*kw, not kw)",
        )
    if transposed:
        notes.insert(
            0,
            f"note: {', '.join(transposed)}: transformers Conv1D weights (in x out), measured "
            "transposed, as their GEMM reads them (quantized along in, not out)",
        )
    return "\n".join([title, *lines, *notes])


def _non_finite_note(name: str, numel: int, count: int, overflowed: int) -> str:
    """The note on a tensor with ``count`` of ``numel`` entries that are not finite in fp32,
    ``overflowed`` of them finite (float64) values beyond fp32's range."""
    if not overflowed:
        if count == numel:
            return f"note: {name}: every entry is inf or NaN, so it has no SQNR"
        return (
            f"note: {name}: {count} of {numel} entries are inf or NaN; its SQNR is over the "
            "finite ones, quantized with those set to 0"
        )
    what = (
        f"{overflowed} of {numel} entries overflow fp32 (|x| > {torch.finfo(torch.float32).max:.4g}),"
        " through which every format quantizes"
    )
    if count > overflowed:
        what += f", and {count - overflowed} are inf or NaN"
    fix = "fix: scale the tensor into fp32's range (e.g. divide it by its largest |x|)"
    if count == numel:
        return f"note: {name}: {what}, so it has no SQNR; {fix}"
    return f"note: {name}: {what}; its SQNR is over the others, set to 0 to quantize; {fix}"


def _schemes_of(chosen: list[str] | None) -> list:
    """The `SCHEMES` of the ``chosen`` formats (all of them without a choice); a `UsageError`
    where none has one (fp32, tf32, e8m0: no recipe quantizes an operand to them)."""
    if chosen is None:
        return SCHEMES
    schemes = [scheme for scheme in SCHEMES if scheme[0] in chosen]
    if not schemes:
        measured = ", ".join(dict.fromkeys(scheme[0] for scheme in SCHEMES))
        raise UsageError(
            f"--tensor measures no scheme of {', '.join(chosen)} (no recipe quantizes an operand "
            f"to it); fix: choose among {measured}, or leave the formats out"
        )
    return schemes


def run(args: argparse.Namespace) -> int:
    chosen = [get(name).name for name in args.names] or None  # an unknown name: its error
    if args.tensor is not None:  # an empty --tensor is refused, not taken for no --tensor
        schemes = _schemes_of(chosen)
        tensors = load_tensors(args.tensor)
        print(error_table(tensors, conv1d_weights(args.tensor, tensors), schemes))
    else:
        print(format_table(chosen))
    return 0
