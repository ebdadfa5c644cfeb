"""`Precision`: the hooks a training loop calls, built from a `Recipe`.

The loop never tests the recipe's name (the pattern of Lightning's precision plugins)::

    precision = Precision(recipe)
    model = precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters()))
    with precision.autocast():
        loss = loss_fn(model(x), y)
    precision.backward(loss)
    precision.clip_grad_norm_(optimizer, 1.0)   # optional; unscales first
    precision.step(optimizer)                   # False when an overflow skipped the step
    optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from lowbit.nn.attention import route_attention
from lowbit.nn.convert import ConversionReport, convert, lowbit_layers
from lowbit.nn.operand import scale_agreement
from lowbit.precision.scaler import LossScaler, NoLossScaler
from lowbit.precision.update import FullPrecisionUpdate, LowPrecisionUpdate
from lowbit.recipes import LossScaling, Recipe, get_recipe
from lowbit.recipes.recipe import DTYPES


class Precision:
    def __init__(self, recipe: Recipe | str, device: torch.device | str | None = None):
        self.recipe = get_recipe(recipe)
        self.device = torch.device(device or "cpu")
        self.param_dtype = DTYPES[self.recipe.param_dtype]
        self.scaler = (
            NoLossScaler()
            if self.recipe.loss_scaling is LossScaling.NONE
            else LossScaler(
                self.recipe.initial_loss_scale,
                dynamic=self.recipe.loss_scaling is LossScaling.DYNAMIC,
                growth_interval=self.recipe.loss_scale_growth_interval,
            )
        )
        if self.param_dtype == torch.float32:
            self.update = FullPrecisionUpdate()
        else:
            self.update = LowPrecisionUpdate(
                master=self.recipe.master_dtype is not None, rounding=self.recipe.update_rounding
            )
        self.skipped_steps = 0
        self.conversion_report = ConversionReport()
        self._model: torch.nn.Module | None = None
        self._grads: list[torch.Tensor] | None = None
        self._grads_finite = True

    # --- set-up ------------------------------------------------------------------------------

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the forward runs under autocast; None without autocast (fp16 emulation
        on CPU replaces fp16 autocast)."""
        if self.recipe.autocast is None or self.emulates_fp16:
            return None
        return DTYPES[self.recipe.autocast]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the forward's activations: autocast's, else the parameters'."""
        return self.autocast_dtype or self.param_dtype

    @property
    def emulates_fp16(self) -> bool:
        """fp16 compute emulated at the GEMM boundaries (CPU: native fp16 GEMMs are slow)."""
        return self.recipe.emulate_fp16_gemms_on_cpu and self.device.type != "cuda"

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        """Cast parameters to the recipe's dtype and swap GEMM layers in place; returns model.

        For bf16 and fp16 compute on CPU a Hugging Face model's ``sdpa`` attention is also switched
        to ``lowbit_sdpa``, whose slow 16-bit kernels run in fp32 (`lowbit.nn.attention`)."""
        if self.param_dtype != torch.float32:
            model.to(self.param_dtype)
        recipe = self.recipe
        if recipe.emulate_fp16_gemms_on_cpu and not self.emulates_fp16:
            recipe = replace(recipe, layer=None)  # fp16 autocast computes the recipe's GEMMs
        if recipe.layer is not None or recipe.overrides:  # overrides apply under autocast too
            convert(model, recipe, self.conversion_report)
        if self.emulates_fp16:
            for layer in lowbit_layers(model).values():
                layer.lowbit_state.output_rounding = torch.float16
        if self.device.type == "cpu" and self.compute_dtype in (torch.bfloat16, torch.float16):
            # PyTorch's 16-bit CPU attention backward is 2-5x slower than fp32's (lowbit.nn.attention)
            route_attention(model)
        self._model = model
        return model

    @property
    def keeps_every_layer(self) -> bool:
        """The recipe converts layers but kept every GEMM layer of this model in high precision
        (nvfp4's end blocks on a 2-block model); False where `convert` did not run (fp16 recipes
        on a GPU compute under autocast instead)."""
        report = self.conversion_report
        return self.recipe.layer is not None and bool(report.kept) and not report.converted

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer to use; the step runs through `step`, which handles master weights."""
        self._optimizer = optimizer
        self.update.wrap(optimizer)
        return optimizer

    # --- the loop ----------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: the recipe's autocast (none: a no-op context)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def _prepare(self, optimizer) -> list[torch.Tensor]:
        """Once per step: high-precision gradients, unscaled, with the joint finite check."""
        if self._grads is None:
            self._grads = self.update.prepare(optimizer)
            # Data-parallel ranks decide jointly, so all of them skip the same steps.
            self._grads_finite = scale_agreement().all_finite(self.scaler.unscale_(self._grads))
        return self._grads

    def clip_grad_norm_(self, optimizer, max_norm: float | None) -> float:
        """Unscale, then clip the total gradient norm to ``max_norm`` (None: only measure)."""
        grads = self._prepare(optimizer)
        if not grads:
            return 0.0
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if hasattr(total, "full_tensor"):  # sharded (FSDP) gradients: the norm over all shards
            total = total.full_tensor()
        if max_norm is not None:  # the arithmetic of torch.nn.utils.clip_grad_norm_
            coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coefficient)
        return total.item()

    def step(self, optimizer) -> bool:
        """Unscale, check, update (or skip), roll the scaling state; True when a step was taken."""
        self._prepare(optimizer)
        found_inf = not self._grads_finite
        if found_inf:
            self.update.abort(optimizer)
            self.skipped_steps += 1
        else:
            self.update.step(optimizer)
        if self._model is not None:
            for layer in lowbit_layers(self._model).values():
                layer.lowbit_state.commit()
        self.scaler.update(found_inf)
        self._grads = None
        return not found_inf

    # --- reporting and state -----------------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        return self.scaler.value

    @property
    def finite_loss_policy(self) -> str:
        """ "skip" where loss scaling can back off from a non-finite loss, "stop" elsewhere."""
        return "skip" if self.scaler.enabled else "stop"

    def state_dict(self) -> dict:
        layers = lowbit_layers(self._model) if self._model is not None else {}
        optimizer = getattr(self, "_optimizer", None)
        return {
            "recipe": self.recipe.name,
            "scaler": self.scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "update": self.update.state_dict(optimizer) if optimizer is not None else {},
            "layers": {name: layer.lowbit_state.state_dict() for name, layer in layers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        optimizer = getattr(self, "_optimizer", None)
        if optimizer is not None:
            self.update.load_state_dict(state.get("update", {}), optimizer)
        if self._model is not None:
            for name, layer in lowbit_layers(self._model).items():
                layer.lowbit_state.load_state_dict(state.get("layers", {}).get(name, {}))
