"""Where the optimizer's arithmetic happens and how its result is rounded back to the parameters.

- `FullPrecisionUpdate`: fp32 parameters; the optimizer steps on them directly.
- `LowPrecisionUpdate`: 16-bit parameters. For the step, each parameter's data is swapped for an
  fp32 tensor (its master weight, or a transient upcast) and its gradient for an fp32 copy; the
  wrapped optimizer, whatever it is, steps in fp32 (its states are fp32); the result is rounded
  back into the 16-bit parameter:

  * master weights (``O2``, Micikevicius et al. 2018): the fp32 copy persists between steps, so
    updates smaller than the 16-bit spacing accumulate in it; write-back rounds to nearest.
  * no master weights, nearest: ``w <- round(w + u)`` loses every update smaller than half the
    spacing of w (bf16: ``|u| < 2**-9 |w|``): the small-update problem.
  * stochastic rounding: ``w <- SR(w + u)`` is unbiased, ``E[w_new] = w + u``, so small updates
    survive in expectation (Zamirai et al. 2020).
  * Kahan compensation: a 16-bit buffer ``c`` keeps what rounding lost, ``v = w + c + u``,
    ``w <- round(v)``, ``c <- round(v - w)`` (Kahan summation; Zamirai et al. 2020), at the cost of
    one extra 16-bit tensor per parameter.
"""

from __future__ import annotations

import torch

from lowbit.formats import cast
from lowbit.recipes.recipe import UpdateRounding


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class FullPrecisionUpdate:
    def wrap(self, optimizer) -> None:
        pass

    def prepare(self, optimizer) -> list[torch.Tensor]:
        """Ready the gradients for unscaling/clipping; returns them."""
        return [p.grad for p in optimizer_params(optimizer) if p.grad is not None]

    def step(self, optimizer) -> None:
        optimizer.step()

    def abort(self, optimizer) -> None:
        """A skipped step: nothing to undo."""

    def state_dict(self, optimizer) -> dict:
        return {}

    def load_state_dict(self, state: dict, optimizer) -> None:
        pass


class LowPrecisionUpdate:
    """16-bit parameters updated in fp32 with master weights, SR or Kahan write-back."""

    def __init__(self, master: bool, rounding: UpdateRounding):
        self.master = master
        self.rounding = rounding
        self.masters: dict[int, torch.Tensor] = {}  # id(param) -> fp32 master
        self.compensation: dict[int, torch.Tensor] = {}  # id(param) -> 16-bit Kahan buffer
        self._low: dict[int, torch.Tensor] = {}  # id(param) -> 16-bit data while swapped

    def wrap(self, optimizer) -> None:
        """Keep fp32 optimizer states fp32 when a checkpoint is loaded.

        ``Optimizer.load_state_dict`` casts floating states to each parameter's dtype; for the
        load, the 16-bit parameters briefly show fp32 data, so the states keep their precision.
        """
        stash: dict[int, torch.Tensor] = {}

        def before_load(opt, state_dict):
            for p in optimizer_params(opt):
                if p.is_floating_point() and p.dtype != torch.float32:
                    stash[id(p)] = p.data
                    p.data = p.data.float()

        def after_load(opt):
            for p in optimizer_params(opt):
                if id(p) in stash:
                    p.data = stash.pop(id(p))

        optimizer.register_load_state_dict_pre_hook(before_load)
        optimizer.register_load_state_dict_post_hook(after_load)

    def _high_precision(self, p: torch.Tensor) -> torch.Tensor:
        if self.master:
            if id(p) not in self.masters:
                self.masters[id(p)] = p.data.float()
            return self.masters[id(p)]
        value = p.data.float()
        if self.rounding is UpdateRounding.KAHAN and id(p) in self.compensation:
            value = value + self.compensation[id(p)].float()
        return value

    def prepare(self, optimizer) -> list[torch.Tensor]:
        grads = []
        for p in optimizer_params(optimizer):
            if p.grad is None or not p.is_floating_point() or p.dtype == torch.float32:
                if p.grad is not None:
                    grads.append(p.grad)
                continue
            self._low[id(p)] = p.data
            grad32 = p.grad.float()
            p.data = self._high_precision(p)
            p.grad = grad32
            grads.append(grad32)
        return grads

    def _round(self, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.rounding is UpdateRounding.STOCHASTIC:
            name = "bf16" if dtype == torch.bfloat16 else "fp16"
            return cast(value, name, "stochastic").to(dtype)
        return value.to(dtype)

    def step(self, optimizer) -> None:
        optimizer.step()
        for p in optimizer_params(optimizer):
            low = self._low.pop(id(p), None)
            if low is None:
                continue
            new = p.data
            rounded = self._round(new, low.dtype)
            if self.master:
                self.masters[id(p)] = new
            if self.rounding is UpdateRounding.KAHAN:
                self.compensation[id(p)] = (new - rounded.float()).to(low.dtype)
            p.grad = None  # the fp32 gradient cannot stay on a 16-bit parameter
            p.data = rounded

    def abort(self, optimizer) -> None:
        """Undo `prepare` for a skipped step: the 16-bit parameters come back untouched."""
        for p in optimizer_params(optimizer):
            low = self._low.pop(id(p), None)
            if low is not None:
                p.grad = None
                p.data = low

    def state_dict(self, optimizer) -> dict:
        order = {id(p): index for index, p in enumerate(optimizer_params(optimizer))}
        return {
            "masters": {order[k]: v.clone() for k, v in self.masters.items() if k in order},
            "compensation": {
                order[k]: v.clone() for k, v in self.compensation.items() if k in order
            },
        }

    def load_state_dict(self, state: dict, optimizer) -> None:
        params = optimizer_params(optimizer)
        self.masters = {id(params[i]): v.clone() for i, v in state.get("masters", {}).items()}
        self.compensation = {
            id(params[i]): v.clone() for i, v in state.get("compensation", {}).items()
        }
