"""SQNR of one low-precision Linear layer against fp32: output, input gradient, weight gradient.

The measurements whose floors the tests assert, printed, so that the figures quoted in the docs
come from a command:

- ``fine-grained``: `tests/recipes/test_fine_grained.py::test_sqnr_floors_vs_fp32`'s layer and
  data (256 tokens x 128 -> 344, activations with log-normal token scales, layer seed 11,
  ``torch.manual_seed(0)`` before the low-precision run), for the fine-grained presets
  (docs/recipes-fine-grained.md, "Measured on this implementation").
- ``layers``: `tests/nn/test_layers.py`'s ``reference_and_lowbit`` (256 x 128 -> 256, Gaussian
  activations drawn after ``torch.manual_seed(--seed)``; the tests draw them unseeded) for the fp8,
  int8 and fp16 presets (docs/recipes.md, "Measured numerics").

    .venv/bin/python benchmarks/layer_sqnr.py [--seed 0]
"""

from __future__ import annotations

import copy
import math

import torch

from lowbit import get_recipe
from lowbit.formats.error import sqnr
from lowbit.nn import LowbitLinear
from lowbit.recipes import LayerSpec

FINE_GRAINED = ["fp8-blockwise", "mxfp8", "mxfp8-rceil", "mxfp6", "mxfp6-rceil", "mxfp4", "nvfp4"]
LAYERS = ["fp8-tensorwise", "fp8-delayed", "fp8-rowwise", "int8", "fp16-mixed"]


def run(layer, x, g):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.backward(g)
    return out.detach(), x.grad, layer.weight.grad


def fine_grained(preset: str) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    m, k, n = 256, 128, 344
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
    w = (torch.rand(n, k, generator=gen) * 2 - 1) / math.sqrt(k)
    g = torch.randn(m, n, generator=gen) * 1e-3

    def layer(spec):
        linear = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            linear.weight.copy_(w)
        return LowbitLinear(linear, spec, seed=11)

    reference = run(layer(LayerSpec()), x, g)
    torch.manual_seed(0)  # the stochastic-rounding draws, after the test's own order
    low = run(layer(get_recipe(preset).layer), x, g)
    return [sqnr(r, lp) for r, lp in zip(reference, low)]


def plain(recipe: str, seed: int) -> list[float]:
    torch.manual_seed(seed)
    x = torch.randn(256, 128)
    linear = torch.nn.Linear(128, 256)
    g = torch.randn(256, 256)
    low_layer = LowbitLinear(copy.deepcopy(linear), get_recipe(recipe).layer)
    reference = run(linear, x, g)
    low = run(low_layer, x, g)
    return [sqnr(r, lp) for r, lp in zip(reference, low)]


def main() -> None:
    from benchmarks_md import ScriptParser

    parser = ScriptParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the Gaussian data of `layers`")
    args = parser.parse_args()
    print("| data | preset | output | grad_input | grad_weight |")
    print("|---|---|---|---|---|")
    for name, measure in (("fine-grained", fine_grained), ("layers", None)):
        for preset in FINE_GRAINED if measure else LAYERS:
            values = measure(preset) if measure else plain(preset, args.seed)
            print(f"| {name} | `{preset}` | " + " | ".join(f"{v:.1f}" for v in values) + " |")


if __name__ == "__main__":
    main()
