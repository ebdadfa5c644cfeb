"""How far a parameter jumps when block-quantized Adam states round a second moment to 0.

torchao's fp8 and 8-bit moments keep one scale per block, so a second moment far below its
block's largest rounds to 0 while the first moment does not, and the next update is
``lr * m / eps`` (docs/memory.md, "zero-point problem"). The case: 8192 parameters at 0, gradient
1 on every 256th and ``small`` elsewhere (1e-3 for fp8, 1e-4 for 8-bit, 1e-3 for the fp32
reference), one step, then two steps of zero gradient, lr 1e-3. Reported: the largest |parameter|
in units of lr.

    .venv/bin/python benchmarks/state_zero_point.py
"""

from __future__ import annotations

import torch

from lowbit.optim import build_optimizer

LR = 1e-3


def main() -> None:
    # no settings; --help says what it measures, and a flag it does not take is refused
    from benchmarks_md import ScriptParser  # here: the module is also imported as benchmarks.NAME

    ScriptParser(description=__doc__.split("\n\n")[0]).parse_args()
    for state, small in (("fp8", 1e-3), ("8bit", 1e-4), ("fp32", 1e-3)):
        param = torch.nn.Parameter(torch.zeros(8192))
        optimizer = build_optimizer([param], lr=LR, state_precision=state)
        grad = torch.full((8192,), small)
        grad[::256] = 1.0
        for g in (grad, torch.zeros(8192), torch.zeros(8192)):
            param.grad = g.clone()
            optimizer.step()
        print(f"{state} states: largest move {param.detach().abs().max().item() / LR:.2g} x lr")


if __name__ == "__main__":
    main()
