"""`lowbit formats`: the table of number formats, or their error on a user's tensors."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowbit.errors import UsageError
from lowbit.formats import FloatFormat, get, names, quantize
from lowbit.formats.error import sqnr

NAME = "formats"
HELP = "Print every number format, or the quantization error of each on a tensor or checkpoint."

# (format, granularity, block_size) combinations measured with --tensor, the ones recipes use.
SCHEMES = [
    ("bf16", "tensor", None),
    ("fp16", "tensor", None),
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
        "--tensor",
        metavar="FILE",
        help="a .pt or .safetensors file: report the SQNR (dB) of every format and granularity "
        "on each floating-point tensor in it",
    )


def format_table() -> str:
    header = (
        f"{'format':<10}{'bits':>5}{'e':>3}{'m':>3}{'bias':>6}{'max':>13}"
        f"{'min normal':>13}{'min subnorm':>13}{'rel. prec.':>12}  inf/nan"
    )
    lines = [header, "-" * len(header)]
    for name in names():
        fmt = get(name)
        if isinstance(fmt, FloatFormat):
            e, m, bias = fmt.ebits, fmt.mbits, fmt.bias
            special = f"{'inf' if fmt.has_inf else '-'}/{'nan' if fmt.has_nan else '-'}"
        else:
            e, m, bias, special = "-", "-", "-", "-/-"
        lines.append(
            f"{name:<10}{fmt.bits:>5}{e:>3}{m:>3}{bias:>6}{fmt.max:>13.6g}"
            f"{fmt.min_normal:>13.6g}{fmt.min_subnormal:>13.6g}{fmt.epsilon:>12.4g}  {special}"
        )
    return "\n".join(lines)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Floating-point tensors of a .pt/.safetensors file (a tensor, or a nested state dict)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"tensor file {path!r} does not exist; pass a .pt or .safetensors file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded = load_file(str(file))
    else:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UsageError(
                f"cannot read {path!r} as a torch file ({error}); pass a .pt file "
                "saved with torch.save, or a .safetensors file"
            ) from None
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.numel() > 1:
                found[prefix or "tensor"] = obj.detach().float()
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(obj, list | tuple):
            for index, value in enumerate(obj):
                walk(f"{prefix}.{index}" if prefix else str(index), value)

    walk("", loaded)
    if not found:
        raise UsageError(f"{path!r} holds no floating-point tensor with more than one element")
    return found


def error_table(tensors: dict[str, torch.Tensor]) -> str:
    labels = [f"{f}/{g}{'' if b is None else b}" for f, g, b in SCHEMES]
    width = max(12, *(len(name) for name in tensors)) + 2
    lines = [f"{'tensor':<{width}}" + "".join(f"{label:>18}" for label in labels)]
    for name, tensor in tensors.items():
        cells = []
        for fmt, granularity, block in SCHEMES:
            q = quantize(tensor, fmt, granularity, block_size=block)
            cells.append(f"{sqnr(tensor, q.dequantize()):>18.2f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "SQNR in dB (higher is better; quantized along the last axis)\n" + "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.tensor:
        print(error_table(load_tensors(args.tensor)))
    else:
        print(format_table())
    return 0
