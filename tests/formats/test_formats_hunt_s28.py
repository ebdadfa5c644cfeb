"""Numerics review s28: a Hadamard transform's zero padding, and amax scales of tiny data."""

import pytest
import torch

from lowbit import kernels
from lowbit.formats import quantize
from lowbit.formats.hadamard import random_signs, transform


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


@pytest.mark.parametrize("cols", [5, 37])
def test_a_transform_pads_as_if_its_input_held_the_zeros(cols):
    """Zero padding is part of the input: its entries are multiplied by their signs like the
    others (-1 * 0 = -0.0), so transforming x equals transforming x padded, signed zeros too.
    Padding after the signs left +0.0 there, and an all-zero block summed to other signed zeros
    than the fused kernel's, which pads first."""
    signs = random_signs(16, 3)
    x = torch.zeros(3, cols)
    padded = torch.nn.functional.pad(x, (0, -cols % 16))
    assert torch.equal(_bits(transform(x, signs)), _bits(transform(padded, signs)))


@pytest.mark.parametrize(
    ("fmt", "granularity", "n"), [("fp4_e2m1", "mx", 32), ("fp8_e4m3", "block", 16)]
)
@pytest.mark.parametrize("axis", [0, 1])
def test_hadamard_quantization_of_padded_zeros_is_bit_identical_on_both_paths(
    fmt, granularity, n, axis
):
    """The fused kernel transforms the blocks itself (transform blocks of the quantization
    blocks' length); its padded zeros must give the PyTorch path's signed zeros."""
    signs = random_signs(n, 3)
    x = torch.zeros(5, 21)
    kwargs = dict(block_size=n, hadamard=signs, axis=axis)
    fused = quantize(x, fmt, granularity, **kwargs)
    with kernels.disabled():
        eager = quantize(x, fmt, granularity, **kwargs)
    assert torch.equal(_bits(fused.values), _bits(eager.values))
    assert torch.equal(_bits(fused.dequantize()), _bits(eager.dequantize()))


def _sqnr_row(out: str, tensor: str) -> dict[str, str]:
    lines = out.splitlines()
    labels = lines[1].split()[1:]
    cells = next(line for line in lines if line.startswith(f"{tensor} ")).split()[1:]
    return dict(zip(labels, cells, strict=True))


def test_formats_command_measures_bf16_and_fp16_as_the_plain_casts_recipes_make(tmp_path, capsys):
    """Recipes cast bf16/fp16 operands without a scale; the table scaled them by amax / max,
    so a bf16 checkpoint showed a 56 dB loss in bf16 and data of 1e-39, which fp16 flushes to
    zero, showed 73 dB in fp16."""
    from lowbit.cli import main

    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "t.pt"
    torch.save(
        {
            "bf16_weight": torch.randn(16, 64, generator=generator).bfloat16(),
            "tiny": torch.randn(16, 64, generator=generator) * 1e-39,
        },
        path,
    )
    assert main(["formats", "--tensor", str(path)]) == 0
    out = capsys.readouterr().out
    assert _sqnr_row(out, "bf16_weight")["bf16/cast"] == "inf"
    tiny = _sqnr_row(out, "tiny")
    assert float(tiny["fp16/cast"]) == 0.0  # every value below fp16's smallest subnormal
    assert float(tiny["fp8_e4m3/tensor"]) > 25  # scaled formats still hold it
