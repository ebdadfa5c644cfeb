"""What the random Hadamard transform (RHT) of the fp4 presets does to one layer's gradient SQNR.

One Linear layer (256 tokens x 128 -> 256) runs forward and backward in fp32 and under the preset
with and without its backward GEMMs' RHT (everything else equal, same stochastic-rounding draws);
reported: SQNR in dB of ``grad_input`` and ``grad_weight`` against fp32, and the RHT's gain
(with - without; negative means the transform lowers SQNR), mean and range over ``--seeds``.
Three kinds of data with outliers: Student-t (3 degrees of freedom) activations and gradients,
sparse outliers (0.1% of elements x 100), and outlier tokens and channels (tokens x 50, gradient
channels x 50, gradient tokens x 20); the last two on activations with log-normal token scales,
as ``tests/recipes/test_fine_grained.py``'s ``outlier_data``. The figures
quoted in docs/recipes-fine-grained.md come from this script.

    .venv/bin/python benchmarks/hadamard_sqnr.py [--recipes nvfp4,mxfp4] [--seeds 3]
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from benchmarks_md import DefaultsFormatter, ScriptParser, at_least, run_script

from lowbit import get_recipe
from lowbit.formats.error import sqnr
from lowbit.nn import LowbitLinear
from lowbit.recipes import LayerSpec, Transform

M, K, N = 256, 128, 256


def student_t(gen: torch.Generator, shape) -> torch.Tensor:
    # Student-t(3) = normal / sqrt(chi2(3) / 3), drawn from the generator for reproducibility.
    chi2 = torch.randn(*shape, 3, generator=gen).pow(2).sum(-1)
    return torch.randn(*shape, generator=gen) / (chi2 / 3).sqrt()


def data(kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if kind == "student-t":
        x = student_t(gen, (M, K))
    else:  # drawn in the order of the test's `data`, so "channels" is its `outlier_data`
        x = torch.randn(M, K, generator=gen) * torch.exp(torch.randn(M, 1, generator=gen))
    w = (torch.rand(N, K, generator=gen) * 2 - 1) / math.sqrt(K)
    if kind == "student-t":
        return x, w, student_t(gen, (M, N)) * 1e-3
    g = torch.randn(M, N, generator=gen) * 1e-3
    if kind == "sparse":
        for t in (x, g):
            t[torch.rand(t.shape, generator=gen) < 1e-3] *= 100.0
    else:  # "channels"
        x[::29] *= 50.0
        g[:, ::23] *= 50.0
        g[::31] *= 20.0
    return x, w, g


def gradients(w, spec, x, g, seed):
    linear = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = LowbitLinear(linear, spec, seed=11) if spec is not None else linear
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same stochastic-rounding draws with and without the RHT
    layer(x).backward(g)
    return x.grad, layer.weight.grad


def main() -> None:
    parser = ScriptParser(description=__doc__.split("\n")[0], formatter_class=DefaultsFormatter)
    parser.add_argument("--recipes", default="nvfp4,mxfp4")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    at_least(parser, args, 1, "seeds")  # the means over no seed were a ZeroDivisionError
    for name in args.recipes.split(","):
        layer = get_recipe(name).layer  # None: fp32 and the 16-bit presets quantize no GEMM
        gemms = () if layer is None else (layer.grad_input, layer.grad_weight)
        if all(gemm.transform is not Transform.HADAMARD for gemm in gemms):
            parser.error(f"--recipes: {name} transforms no GEMM (mxfp4 and nvfp4 do)")
    print("| recipe | data | GEMM | SQNR with RHT (dB) | without (dB) | RHT gain (dB), range |")
    print("|---|---|---|---|---|---|")
    for name in args.recipes.split(","):
        layer = get_recipe(name).layer
        without = LayerSpec(
            layer.forward,
            replace(layer.grad_input, transform=Transform.NONE),
            replace(layer.grad_weight, transform=Transform.NONE),
        )
        for kind in ("student-t", "sparse", "channels"):
            rows = {"grad_input": [], "grad_weight": []}
            for seed in range(args.seeds):
                x, w, g = data(kind, seed)
                exact = gradients(w, None, x, g, seed)
                with_rht = gradients(w, layer, x, g, seed)
                no_rht = gradients(w, without, x, g, seed)
                for i, gemm in enumerate(rows):
                    rows[gemm].append((sqnr(exact[i], with_rht[i]), sqnr(exact[i], no_rht[i])))
            for gemm, pairs in rows.items():
                if getattr(layer, gemm).transform is not Transform.HADAMARD:
                    continue  # nvfp4 transforms the weight gradient's inputs only
                gains = [a - b for a, b in pairs]
                mean_with = sum(a for a, _ in pairs) / len(pairs)
                mean_without = sum(b for _, b in pairs) / len(pairs)
                print(
                    f"| {name} | {kind} | {gemm} | {mean_with:.1f} | {mean_without:.1f} | "
                    f"{sum(gains) / len(gains):+.1f} ({min(gains):+.1f} .. {max(gains):+.1f}) |"
                )


if __name__ == "__main__":
    run_script(main)
