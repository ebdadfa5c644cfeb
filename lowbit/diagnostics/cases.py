"""Cases built to break a recipe, for tests and benchmarks of the doctor.

`inject_outliers` gives chosen input channels of chosen linear layers a large power-of-two gain
``G`` and divides the matching weight columns by ``G``. In exact (or bf16/fp32) arithmetic the
layer computes the same function and its weight gets the same gradient, but its GEMM operands now
look like a trained LLM's: a few activation channels ``G`` times larger than the rest (the
outlier features of Dettmers et al. 2022 and the SwiGLU outliers of Fishman et al. 2024) and
matching tiny weight columns. A tensorwise-scaled format spends its range on the outliers and
flushes the rest; block scaling along the contraction axis does not fix a channel outlier either.
"""

from __future__ import annotations

import fnmatch
import types

import torch
import torch.nn.functional as F


def inject_outliers(
    model: torch.nn.Module, pattern: str, channels=(0, 1), gain: float = 2.0**14
) -> list[str]:
    """Give ``channels`` of the inputs of the linear layers matching ``pattern`` a gain; returns
    the layers changed. ``gain`` should be a power of two (exact in every float format)."""
    from lowbit.nn.linear import LowbitLinear, lowbit_linear

    changed = []
    for name, module in model.named_modules():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        if not isinstance(module, LowbitLinear | torch.nn.Linear):
            continue
        g = torch.ones(module.in_features, device=module.weight.device)
        g[list(channels)] = gain

        def forward(self, x, g=g):
            gx = g.to(x.dtype)
            w = self.weight / g.to(self.weight.dtype)
            if isinstance(self, LowbitLinear) and not self.spec.is_identity:
                return lowbit_linear(x * gx, w, self.bias, self.lowbit_state)
            return F.linear(x * gx, w, self.bias)

        module.forward = types.MethodType(forward, module)
        changed.append(name)
    return changed
