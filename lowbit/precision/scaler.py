"""Loss scaling: keep small fp16 gradients above fp16's underflow threshold.

The loss is multiplied by a scale ``S`` before backward, so every gradient is ``S`` times larger,
and gradients are divided by ``S`` (unscaled) before the optimizer step. Dynamic scaling
(Micikevicius et al. 2018) halves ``S`` and skips the step when a gradient is inf/NaN, and doubles
``S`` after ``growth_interval`` overflow-free steps. The arithmetic is PyTorch's own
(``torch._amp_foreach_non_finite_check_and_unscale_``, ``torch._amp_update_scale_``), so the scale
trajectory equals ``torch.amp.GradScaler``'s for the same gradients.

Unlike GradScaler's, the scale has a floor, fp32's smallest normal number 2^-126: GradScaler's
halves on to 0 (after 165 overflows in a row from 2^16), and from 2^-128 down its reciprocal, by
which the gradients are unscaled, is inf. PyTorch's unscale checks the gradients before it
multiplies them, so the next step with finite gradients took inf and NaN ones and wrote them into
the weights. The trajectories agree until GradScaler's falls below the floor.

`NoLossScaler` is the disabled feature as an object: scale 1, nothing to unscale, never skips.
"""

from __future__ import annotations

import warnings

import torch

from lowbit.errors import UsageError
from lowbit.precision.update import local_values

# The loss scale's floor: 2^-126, fp32's smallest normal, whose reciprocal is finite (see the
# module's docstring)
SMALLEST_SCALE = torch.finfo(torch.float32).tiny


class NoLossScaler:
    enabled = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, grads: list[torch.Tensor], divide: bool = True) -> bool:
        """Returns whether every gradient is finite (always True: no check is made)."""
        return True

    def update(self, found_inf: bool) -> None:
        pass

    @property
    def value(self) -> float:
        return 1.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossScaler:
    """Static (``dynamic=False``) or dynamic loss scaling with GradScaler's defaults."""

    enabled = True

    def __init__(
        self,
        init_scale: float = 2.0**16,
        dynamic: bool = True,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        if not init_scale >= SMALLEST_SCALE:
            raise UsageError(
                f"loss scale {init_scale!r} is below its floor {SMALLEST_SCALE:.4g} (2^-126, "
                "fp32's smallest normal): from 2^-128 down the reciprocal that unscales the "
                "gradients is inf, and the step writes inf into the weights; fix: e.g. 65536 "
                "(2^16, GradScaler's start)"
            )
        self._scale = torch.full((), init_scale, dtype=torch.float32)
        self._growth_tracker = torch.zeros((), dtype=torch.int32)
        self.dynamic = dynamic
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale.to(loss.device)

    def unscale_(self, grads: list[torch.Tensor], divide: bool = True) -> bool:
        """Divide ``grads`` by the scale in place; returns whether all of them are finite.
        ``divide=False`` only checks them (gradients unscaled by an earlier step already).

        A sparse gradient (``nn.Embedding(sparse=True)``) is checked and unscaled through its
        values, as GradScaler does: PyTorch's fused unscale takes dense tensors only."""
        found_inf = torch.zeros(1, dtype=torch.float32)
        inv_scale = self._scale.double().reciprocal().float().reshape(1)
        if not divide:
            inv_scale = torch.ones_like(inv_scale)
        by_device: dict[tuple, list[torch.Tensor]] = {}
        for grad in map(local_values, grads):  # FSDP: each rank checks and unscales its shard
            values = grad._values() if grad.is_sparse else grad  # a view: unscaled in place
            by_device.setdefault((values.device, values.dtype), []).append(values)
        for (device, _), group in by_device.items():
            found = found_inf.to(device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale.to(device))
            found_inf = found_inf + found.cpu()
        return found_inf.item() == 0

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        torch._amp_update_scale_(
            self._scale,
            self._growth_tracker,
            torch.full((1,), float(found_inf)),
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        )
        if self._scale < SMALLEST_SCALE:
            self._scale.fill_(SMALLEST_SCALE)
            warnings.warn(
                f"lowbit: the loss scale fell to its floor {SMALLEST_SCALE:.4g} (2^-126): the "
                "gradients overflow at every scale, so every step is skipped; fix: find the "
                "non-finite loss, weight or input (lowbit doctor), or a lower learning rate",
                stacklevel=4,  # the loop's `backward` (update <- _move_scale <- backward)
            )

    @property
    def value(self) -> float:
        return self._scale.item()

    def state_dict(self) -> dict:
        return {"scale": self._scale.clone(), "growth_tracker": self._growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        """An empty ``state`` (saved under a recipe without loss scaling, loaded into one with it:
        a run that switches recipe) has no scale to restore: this one's stays."""
        if not state:
            return
        self._scale = state["scale"].clone()
        self._growth_tracker = state["growth_tracker"].clone()
