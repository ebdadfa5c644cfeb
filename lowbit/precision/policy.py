"""`Precision`: the hooks a training loop calls, built from a `Recipe`.

The loop never tests the recipe's name (the pattern of Lightning's precision plugins)::

    precision = Precision(recipe)
    model = precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters()))
    with precision.autocast():
        loss = loss_fn(model(x), y)
    precision.backward(loss)
    precision.clip_grad_norm_(optimizer, 1.0)   # optional; unscales first (or: unscale_)
    precision.step(optimizer)                   # False when an overflow skipped the step
    optimizer.zero_grad()

Several models and optimizers (a GAN's generator and discriminator, a student and its teacher) go
through one `Precision`: convert and wrap each, and step them with one loss scale, as GradScaler's
``step(a); step(b); update()`` does: `step` skips only an optimizer whose own gradients overflowed,
and the loss scale moves once per iteration, before the next `backward` (or when it is read).
`state_dict` covers every converted model and wrapped optimizer; `load_state_dict` may come before
`convert` and `wrap_optimizer`, and its parts are applied when their model or optimizer arrives.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import numbers
import sys
import warnings
import weakref
from dataclasses import fields, is_dataclass, replace
from enum import Enum

import torch

from lowbit.distributed.context import warn_if_ranks_act_alone
from lowbit.errors import UsageError
from lowbit.formats import Granularity, Rounding
from lowbit.formats.scaling import block_shape, default_rule
from lowbit.models.pretrained import check_autocast
from lowbit.nn.attention import route_attention
from lowbit.nn.convert import (
    ConversionReport,
    check_model,
    convert,
    is_convertible,
    layers_holding,
    lowbit_layers,
    replaced_by_plain_layers,
    session_42_layer_names,
    swapped_layers,
    unwrapped,
    unwrapped_tensors,
)
from lowbit.nn.experts import LowbitExperts
from lowbit.nn.linear import LowbitModule
from lowbit.nn.operand import scale_agreement
from lowbit.precision.scaler import LossScaler, NoLossScaler
from lowbit.precision.update import (
    FullPrecisionUpdate,
    LowPrecisionUpdate,
    dtype_following_states,
    local_values,
    optimizer_params,
    rounded_states,
    upcast_states,
)
from lowbit.recipes import LossScaling, Recipe, UpdateRounding, get_recipe
from lowbit.recipes.presets import is_built_in, own_name_fix
from lowbit.recipes.recipe import DTYPES, OperandSpec, dtype_name


class Precision:
    """The hooks of a training loop's precision under ``recipe`` (a preset's name or a `Recipe`;
    see the module's docstring for the loop). ``device``: where the model computes; without it,
    the device type of the first model `convert` is given (`_model_device`; the CPU until then).
    `autocast` is that device's autocast, and `backward` refuses a loss on another device type
    where the recipe computes otherwise there (`_check_loss`), `autocast` a model moved off a
    device taken from it."""

    def __init__(self, recipe: Recipe | str, device: torch.device | str | None = None):
        self.recipe = get_recipe(recipe)
        self.device = torch.device(device or "cpu")
        # how `device` was set: "given", "model" (taken from the first model converted), or
        # None (neither yet: the CPU)
        self._device_from = "given" if device is not None else None
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
        self.skipped_steps = 0  # iterations in which an overflow skipped a step
        self.conversion_report = ConversionReport()
        self._models: list[torch.nn.Module] = []
        # for each model, the names of the modules its last `convert` swapped in, less those
        # found replaced by plain layers since and warned about (`_warn_replaced_layers`)
        self._swapped: list[set[str]] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        # id(optimizer) -> the tensors its step updates, whose .grad hold the unscaled
        # high-precision gradients, and whether all are finite, from `unscale_` (or
        # `clip_grad_norm_`, `step`) until its step is taken
        self._prepared: dict[int, tuple[list[torch.Tensor], bool]] = {}
        self._overflowed: bool | None = None  # in the steps since the scale last moved (None: none)
        self._pending: dict = {}  # parts of a loaded state whose model or optimizer is to come
        # from `load_state_dict` to the next `step`: `state_dict` saves `_pending` too
        self._unstepped_load = False
        self._stepping = False  # within `step` (`_refuse_direct_step`)
        self._backwards = 0  # `backward` calls so far
        self._backward_at_step: dict[int, int] = {}  # id(optimizer) -> `_backwards` at its step
        # a `step` of several optimizers interrupted after some had stepped: `_backwards` then,
        # and id(optimizer) -> whether its step was taken (True) or skipped on an overflow
        self._interrupted_call: tuple[int, dict[int, bool]] | None = None
        # id(optimizer) -> `_grad_marks` of its gradients as the last `backward` left them, under
        # loss scaling (`_warn_scaled_gradients_changed`)
        self._marks: dict[int, list[tuple[int, int | torch.Tensor]]] = {}
        self._changed_warned = False
        self._unconverted_warned = False  # `_warn_unconverted`'s warning, said once
        self._elsewhere_warned = False  # `_warn_converted_elsewhere`'s, said once
        # the layers `convert` found converted in the models it was given, those since replaced
        # by others included (`_warn_converted_elsewhere`)
        self._own_layers: weakref.WeakSet = weakref.WeakSet()
        # id(param) -> a weak reference to each parameter `convert` cast up to fp32, whose
        # optimizer states are cast with it (`_upcast_states`)
        self._cast_up: dict[int, weakref.ref] = {}
        # the optimizers `_upcast_states` has met, whose states it casts only where `convert`
        # casts more parameters up
        self._met: weakref.WeakSet = weakref.WeakSet()
        # id(optimizer) -> an optimizer stepped under loss scaling without `wrap_optimizer` (fp32
        # parameters step it as it is), held weakly: `backward` marks its gradients too
        self._unwrapped: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

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
        """Cast parameters to the recipe's dtype and swap GEMM layers in place; returns model
        (for a bare layer, e.g. an ``nn.Linear``, its converted replacement).

        For bf16 and fp16 compute on CPU a Hugging Face model's ``sdpa`` attention is also switched
        to ``lowbit_sdpa``, whose slow 16-bit kernels run in fp32 (`lowbit.nn.attention`). An
        architecture whose forward fails under the recipe's autocast is refused (`check_autocast`).
        A Precision given no device takes the model's device type (`_model_device`), once the
        model is converted: a refused model leaves it to the next.

        Under 16-bit parameters (bf16-low, fp16-low, bf16-pure) the model's floating buffers are
        cast with them, except a Hugging Face rotary embedding's frequencies (`_rotary_buffers`)."""
        check_model(model, "precision.convert")
        device = self._model_device(model)  # refused before anything changes
        if device is None:
            return self._convert(model)
        kept, self.device = self.device, device  # what `_convert` does depends on it (fp16
        # emulation, attention routing, `check_autocast`)
        try:
            model = self._convert(model)
        except BaseException:
            self.device = kept
            raise
        self._device_from = "model"
        return model

    def _convert(self, model: torch.nn.Module) -> torch.nn.Module:
        """`convert` on this Precision's device."""
        check_autocast(model, self.autocast_dtype, self.recipe.name)
        # Under an fp32-parameter recipe a model whose trained parameters are fp32 is left as it
        # is (plain PyTorch's bits, and a frozen 16-bit base under fp32 adapters keeps its
        # memory); one trained in 16 bits (``from_pretrained(..., torch_dtype=torch.bfloat16)``,
        # ``model.half()``) is cast up: left so, the optimizer would step its weights without the
        # fp32 weights the recipe promises, and fp16 gradients would underflow unscaled. Its
        # frozen GEMM weights that autocast casts anyway keep their 16 bits (`_kept_16_bit`).
        if self.param_dtype != torch.float32:
            self._check_parameters_fit(model)
            rotary = _rotary_buffers(model)
            model.to(self.param_dtype)
            for (module, name), frequencies in rotary.items():
                module._buffers[name] = frequencies
        elif any(
            p.requires_grad and p.is_floating_point() and p.dtype != torch.float32
            for p in model.parameters()
        ):
            kept = self._kept_16_bit(model)
            cast = [
                p
                for p in model.parameters()
                if id(p) not in kept and p.is_floating_point() and p.dtype != torch.float32
            ]
            self._cast_up.update((id(p), weakref.ref(p)) for p in cast)
            model._apply(lambda t: t if id(t) in kept or not t.is_floating_point() else t.float())
            met = {
                id(opt): opt for opt in (*self._optimizers, *self._unwrapped.values(), *self._met)
            }
            for optimizer in met.values():
                self._upcast_states(optimizer, 4, cast)
        recipe = self.recipe
        if recipe.emulate_fp16_gemms_on_cpu and not self.emulates_fp16:
            recipe = replace(recipe, layer=None)  # fp16 autocast computes the recipe's GEMMs
        if recipe.layer is not None or recipe.overrides:  # overrides apply under autocast too
            # a bare layer, converted or not (converting again is harmless): nothing holds it,
            # the new layer is returned
            layer = unwrapped(model)  # (a compiled layer is a bare layer too)
            if is_convertible(layer) or isinstance(layer, (LowbitModule, LowbitExperts)):
                holder = torch.nn.Sequential(model)
                convert(holder, recipe, self.conversion_report)
                model = holder[0]
            else:
                convert(model, recipe, self.conversion_report)
        if self.emulates_fp16:
            for layer in lowbit_layers(model).values():
                layer.lowbit_state.output_rounding = torch.float16
        if self.device.type == "cpu" and self.compute_dtype in (torch.bfloat16, torch.float16):
            # PyTorch's 16-bit CPU attention backward is 2-5x slower than fp32's (lowbit.nn.attention)
            route_attention(model)
        # a model converted inside a wrapper (``DDP(model)``) and outside it is one model
        if all(unwrapped(known) is not unwrapped(model) for known in self._models):
            self._models.append(model)
            self._swapped.append(set())
        index = next(
            i for i, known in enumerate(self._models) if unwrapped(known) is unwrapped(model)
        )
        self._swapped[index] = swapped_layers(model)
        self._own_layers.update(
            module
            for module in model.modules()
            if isinstance(module, (LowbitModule, LowbitExperts))
        )
        self._apply_pending()
        return model

    def _upcast_states(self, optimizer, stacklevel: int, params: list | None = None) -> None:
        """Cast to fp32 the states ``optimizer`` holds of parameters `convert` cast up from 16 bits
        (or fp64): an optimizer built on the 16-bit model before `convert` keeps the states its
        constructor made in the parameters' old dtype (Adagrad's sum), which torch's step then
        used beside the fp32 weights: in fp16, Adagrad's eps of 1e-10 is 0, and its first step
        divided 0 by 0 and wrote NaN into every weight.

        Once where an optimizer and such parameters meet: `convert` casts the states of the
        ``params`` it cast in the optimizers met before, and an optimizer met after it (at
        `wrap_optimizer`, or the first step of one never wrapped) has those of every parameter
        cast so far cast then. Not at every step: the states it makes itself afterwards are in
        the dtypes it chose (a momentum kept bf16 on purpose stays bf16), and reading every state
        at every step cost time in proportion to the parameters.

        Warned of (``stacklevel``: the user's call's): 16-bit states a step or
        a load made (`rounded_states`), which torch's ``load_state_dict`` rounded to the 16-bit
        parameters' dtype, so that a run resumed so was silently not the saved one."""
        if params is None:
            if optimizer in self._met:
                return
            with contextlib.suppress(TypeError):  # not weakly referable: met again at each step
                self._met.add(optimizer)
            refs = [(p, self._cast_up.get(id(p))) for p in optimizer_params(optimizer)]
            params = [p for p, ref in refs if ref is not None and ref() is p]
        states = dtype_following_states(optimizer, params)
        rounded = sorted({key for state in states for key in rounded_states(state)})
        if rounded:
            warnings.warn(
                f"lowbit: the {type(optimizer).__name__}'s states ({', '.join(rounded)}) were "
                "stepped or loaded on the 16-bit model, rounded to its dtype, before "
                "precision.convert() cast it to fp32: cast up now, they are not the saved or fp32 "
                "ones (a resumed run is not the saved one); fix: load the optimizer state after "
                "model = precision.convert(model)",
                stacklevel=stacklevel,
            )
        upcast_states(states)

    def _model_device(self, model: torch.nn.Module) -> torch.device | None:
        """The device a Precision given no device takes from the first model `convert` is given,
        refusing what it cannot take (a user's loop on a GPU model got the CPU's autocast, which
        left its forward in fp32: refused at the first backward, unnoticed in a loop of forward
        passes only). Its parameters' device *type* (``cuda``, not ``cuda:0``): autocast works
        per type, so a model over several GPUs (a ``device_map``), or a student and its teacher
        on two, compute alike. A model over several types (layers offloaded to the CPU) is
        refused, as is a later model of another type than the first's: whose autocast is the
        user's to say. None, taking and refusing nothing: a device given, a recipe that computes
        alike on any device (`_computes_alike_anywhere`), and a model on the meta device (built
        there, it is converted before ``to_empty``)."""
        if self._device_from == "given" or self._computes_alike_anywhere():
            return None
        types = sorted({p.device.type for p in model.parameters()} - {"meta"})
        name = self.recipe.name
        if len(types) > 1:
            accelerator = next(kind for kind in types if kind != "cpu")
            raise UsageError(
                f"precision.convert() got a model spread over {', '.join(types)}, and this "
                f"Precision was given no device to compute on; fix: lowbit.Precision({name!r}, "
                f"device={accelerator!r}), or the device its forward computes on"
            )
        if not types:
            return None
        device = torch.device(types[0])
        if self._device_from == "model" and device != self.device:
            raise UsageError(
                f"precision.convert() got a model on {device}, and this Precision computes on "
                f"{self.device}, the device of the first model it converted; fix: move the models "
                f"to one device type before converting them, or lowbit.Precision({name!r}, "
                f"device={device.type!r}) for this one"
            )
        return device

    def _computes_alike_anywhere(self) -> bool:
        """Whether the device changes nothing of what is computed: fp32 compute (no autocast, no
        16-bit parameters), no fp16 emulated (a CPU's only), no random draws (stochastic
        rounding's generator is the device's), in the recipe (before `convert` swaps a layer) or
        a converted layer (`auto`'s plan). Such a Precision takes no device from a model and
        refuses none (`_model_device`, `_check_loss`; its `autocast` is a no-op context): the
        ``fp32`` preset on a model over a GPU and the CPU, or a teacher on another device."""
        recipe = self.recipe
        specs = [recipe.layer, *(override.layer for override in recipe.overrides)]
        return (
            self.compute_dtype == torch.float32
            and not recipe.emulate_fp16_gemms_on_cpu
            and not self._draws_random()
            and not any(
                operand.rounding is Rounding.STOCHASTIC
                for spec in specs
                if spec is not None
                for operand in spec.operands().values()
            )
        )

    def _check_parameters_fit(self, model: torch.nn.Module) -> None:
        """Refuse a model whose finite parameters the recipe's 16-bit dtype would hold as inf:
        fp16's largest value is 65504 (a value from 65520 up rounds to inf), and a pretrained
        folder's weight beyond it became inf without a word, in the parameters and in the fp32
        master copy made from them; every step then overflowed, the dynamic scale backed off for
        ~140 steps and the run stopped with a loss that was never finite. (bf16's largest is
        within 0.4% of fp32's: a weight is rarely beyond it.)"""
        dtype = self.param_dtype
        limit = torch.finfo(dtype).max
        short = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        fix = "a recipe with fp32 parameters (fp16-mixed, bf16-mixed)" + (
            " or bf16 ones (bf16-low)" if dtype == torch.float16 else ""
        )
        # buffers too: `model.to` casts a floating buffer (a scale, a table) the same way
        for name, p in unwrapped_tensors(model, buffers=True):
            weights = p.detach()
            if not p.is_floating_point() or p.dtype == dtype or weights.numel() == 0:
                continue
            if weights.is_meta or type(weights) is not torch.Tensor:
                continue  # no values to read here: a meta model (`lowbit export` converts one), a
                # fake tensor; a DTensor's shard (one rank refusing alone left the others waiting)
            low, high = torch.aminmax(weights)  # a NaN or inf among them: the mask below
            if max(-float(low), float(high)) <= limit:
                continue  # the common case: one pass, nothing allocated
            overflow = weights.isfinite() & weights.to(dtype).isinf()
            if bool(overflow.any()):
                largest = float(weights[overflow].abs().amax())
                raise UsageError(
                    f"{name} holds {largest:.4g}, beyond {short}'s largest value {limit:.6g}: "
                    f"{self.recipe.name}'s {short} parameters would hold it as inf; fix: {fix}"
                )

    def _kept_16_bit(self, model: torch.nn.Module) -> set[int]:
        """The ids of the frozen 16-bit parameters that stay 16-bit where `convert` casts a model
        up to fp32: under autocast, those held only by linear and convolution layers (lowbit's
        converted ones included). Autocast rounds such a weight to its dtype for every GEMM, and
        a 16-bit value's rounding is the same from 16 bits as from its exact fp32 copy, so the
        model computes what the wholesale cast computes, bit for bit, and a frozen bf16 base under
        trainable adapters keeps half the memory. Elsewhere they are cast up: without autocast
        (``fp32``, fp16 emulated on CPU) ``F.linear`` refuses an fp32 input with a bf16 weight,
        and norms and embeddings (whose outputs set the dtype of the residual stream) compute in
        their weight's dtype, as CPU's ``layer_norm`` refuses an fp32 input with bf16 weights."""
        if self.autocast_dtype is None:
            return set()
        keeps: dict[int, bool] = {}  # id(param) -> whether every module holding it keeps it
        for module in model.modules():
            gemm = type(module) in _AUTOCAST_GEMMS or isinstance(module, LowbitModule)
            for p in module.parameters(recurse=False):
                # (a leftover .grad is cast up with the model, and a 16-bit weight refuses it)
                frozen = not p.requires_grad and p.grad is None
                keep = gemm and frozen and p.dtype in (torch.bfloat16, torch.float16)
                keeps[id(p)] = keeps.get(id(p), True) and keep
        return {key for key, keep in keeps.items() if keep}

    def _layers(self) -> dict[str, LowbitModule]:
        """The converted layers of every converted model by name; a second model's names carry
        its position (``1:model.layers.0.mlp.up_proj``), so that no two layers share a key. The
        names are the unwrapped model's (`lowbit_layers`): a run converted inside
        ``DistributedDataParallel`` or `torch.compile`'s wrapper resumes outside it (a single-process
        resume, an evaluation), and the converse."""
        layers = {}
        for index, model in enumerate(self._models):
            prefix = f"{index}:" if index else ""
            layers.update({prefix + name: layer for name, layer in lowbit_layers(model).items()})
        return layers

    def _params(self) -> list[torch.Tensor]:
        """The parameters of every wrapped optimizer, in wrapping order (the indices by which
        `state_dict` keys master weights and Kahan buffers)."""
        return [p for optimizer in self._optimizers for p in optimizer_params(optimizer)]

    @property
    def keeps_every_layer(self) -> bool:
        """The recipe converts layers but kept every GEMM layer of this model in high precision
        (nvfp4's end blocks on a 2-block model); False where `convert` did not run (fp16 recipes
        on a GPU compute under autocast instead)."""
        return self.recipe.layer is not None and self.conversion_report.kept_every_layer

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer to use; the step runs through `step`, which handles master weights.

        What is not an optimizer (``model.parameters()``, the class ``torch.optim.AdamW``, a list
        of optimizers) is refused here in one line, not by an AttributeError at the first `step`
        or `state_dict`."""
        if not _is_optimizer(optimizer) or isinstance(optimizer, type):
            given = (
                f"the class {optimizer.__name__}"
                if isinstance(optimizer, type)
                else f"a {type(optimizer).__name__}"
            )
            raise UsageError(
                f"precision.wrap_optimizer() takes an optimizer, not {given}; fix: optimizer = "
                "precision.wrap_optimizer(torch.optim.AdamW(model.parameters())), once for each "
                "optimizer"
            )
        if all(known is not optimizer for known in self._optimizers):
            self._refuse_infinite_parameters(optimizer)
            self._add_optimizer(optimizer)
            self.update.wrap(optimizer)
            self._upcast_states(optimizer, 3)
            _guard_steps(optimizer, self)
        self._warn_replaced_layers(3)
        self._apply_pending()
        return optimizer

    def _refuse_infinite_parameters(self, optimizer) -> None:
        """Refuse an optimizer of a 16-bit parameter that holds inf, before anything is wrapped.

        `convert` refuses a model whose values its 16-bit dtype cannot hold
        (`_check_parameters_fit`), but not one on the meta device, which has no values yet: loaded
        after ``to_empty``, a pretrained weight beyond fp16's 65504 became inf in the fp16
        parameter and its master copy, and every step was skipped as an overflow without a word
        (``precision.step`` returned False, the loss scale backing off for ever).

        Checked per device, one read each (a model placed over devices by a ``device_map``: one
        stack of all the flags failed on the first parameter elsewhere); a parameter still on the
        meta device holds no values to check."""
        if self.param_dtype == torch.float32:
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in optimizer_params(optimizer):
            # a DTensor's shard is skipped: one rank refusing alone left the others waiting
            if p.dtype == self.param_dtype and type(p.detach()) is torch.Tensor and not p.is_meta:
                by_device.setdefault(p.device, []).append(p)
        first = None
        for params in by_device.values():
            flags = torch.stack([p.detach().isinf().any() for p in params]).tolist()
            if True in flags:
                first = params[flags.index(True)]
                break
        if first is None:
            return
        names = {id(p): name for model in self._models for name, p in unwrapped_tensors(model)}
        name = names.get(id(first), f"a parameter of shape {tuple(first.shape)}")
        short = dtype_name(self.param_dtype)
        limit = torch.finfo(self.param_dtype).max
        raise UsageError(
            f"{name} holds inf, and training it under {self.recipe.name}'s {short} parameters "
            f"would skip every step: a value beyond {short}'s largest {limit:.6g} was written "
            "into it (weights loaded after precision.convert() of a model on the meta device); "
            "fix: load the weights before precision.convert() (to_empty, load_state_dict, then "
            "convert), which refuses what the recipe cannot hold"
        )

    def _add_optimizer(self, optimizer) -> None:
        """List a newly wrapped optimizer. One that shares a parameter with optimizers wrapped
        before supersedes them (an optimizer rebuilt after ``resize_token_embeddings``, or to
        change its param groups when unfreezing layers): it takes the place of the first, the
        others leave the list, and the master weights and Kahan buffers of the parameters no
        optimizer holds any more are dropped. Kept, the old optimizer's share of `state_dict`
        went on being saved, and a resumed run, which builds only the new one, paired it with
        the new parameters by position ("the saved master weight of parameter 11 has shape
        (64, 32), the parameter (80, 32)"); and its dropped parameters stayed in memory with
        their fp32 masters. Optimizers over disjoint parameters (a GAN's two), and one that
        shares some of its parameters with the new one and keeps others the model still holds
        (a main optimizer beside a head-only one), all stay."""
        own = {id(p) for p in optimizer_params(optimizer)}
        # without a converted model, every parameter counts as still held
        holders = self._models or [torch.nn.ParameterList(self._params())]
        in_models = {id(p) for model in holders for p in model.parameters()}
        superseded = [
            index
            for index, known in enumerate(self._optimizers)
            if _supersedes(own, {id(p) for p in optimizer_params(known)}, in_models)
        ]
        if not superseded:
            self._optimizers.append(optimizer)
            return
        for index in superseded:
            old = self._optimizers[index]
            self.update.release(old)
            self._prepared.pop(id(old), None)
            self._backward_at_step.pop(id(old), None)
        order = [index for index in range(len(self._optimizers)) if index not in superseded[1:]]
        done = self._pending.get("update_done")
        if done:  # a loaded state being handed on: its optimizers' positions, as they move
            self._pending["update_done"] = {
                new: done[old] for new, old in enumerate(order) if old in done
            }
        self._optimizers = [
            optimizer if index == superseded[0] else self._optimizers[index] for index in order
        ]
        self.update.keep_only(self._params())

    def _warn_at_first_steps(self, optimizers: list, stacklevel: int) -> None:
        """`_warn_replaced_layers` at the first step (or unscaling) of an optimizer, which may
        not be wrapped (fp32 parameters step without it); not at every step."""
        if any(id(optimizer) not in self._backward_at_step for optimizer in optimizers):
            self._warn_replaced_layers(stacklevel + 1)
            self._warn_unconverted(stacklevel + 1)
            self._warn_converted_elsewhere(optimizers, stacklevel + 1)

    def _warn_unconverted(self, stacklevel: int) -> None:
        """Warn, once, at the first step of a Precision that `convert` was given no model, where
        its recipe converts layers or casts the parameters. A model converted by
        ``lowbit.convert(model, recipe)`` alone trained silently otherwise than under
        `convert`: fp8-delayed's amax histories, which `step` commits for the layers of the models
        it converted, never moved (every step scaled with its current amax, fp8-tensorwise's
        losses bit for bit), fp16-mixed on a CPU left out the fp16 rounding of the GEMM outputs,
        and `state_dict` left the layers out; an unconverted model trained in its own dtype and
        formats (bf16-low's weights stayed fp32)."""
        if self._models or self._unconverted_warned:
            return
        recipe = self.recipe
        converts = recipe.layer is not None or bool(recipe.overrides)
        if recipe.emulate_fp16_gemms_on_cpu and not self.emulates_fp16:
            converts = False  # fp16 autocast on a GPU computes the GEMMs: `convert` swaps none
        if not converts and self.param_dtype == torch.float32:
            return
        self._unconverted_warned = True
        warnings.warn(
            f"lowbit: precision.step() under recipe {recipe.name}, and precision.convert() was "
            "given no model: a model converted by lowbit.convert() alone trains without what "
            "precision.convert() sets up (the parameter dtype, delayed-scaling histories that move, "
            "fp16's emulated roundings, the layers' part of precision.state_dict()), an "
            "unconverted one in its own formats; fix: model = precision.convert(model) before "
            "training (it leaves layers converted with this recipe as they are)",
            stacklevel=stacklevel,
        )

    def _warn_converted_elsewhere(self, optimizers: list, stacklevel: int) -> None:
        """Warn, once, at the first step of optimizers of the converted layers of a model that
        `convert` was not given, where it was given another (`_warn_unconverted` speaks where it
        was given none): a GAN's second model converted by ``lowbit.convert(model, recipe)``
        alone trained without a word, fp8-delayed's amax histories never moving (`step` commits
        those of the models `convert` was given), and `state_dict` left its layers out."""
        if not self._models or self._elsewhere_warned:
            return
        stepped = {id(p) for optimizer in optimizers for p in optimizer_params(optimizer)}
        known = {id(module) for model in self._models for module in model.modules()}
        outside = [
            layer
            for layer in layers_holding(stepped)
            if id(layer) not in known and layer not in self._own_layers
        ]
        if not outside:
            return
        self._elsewhere_warned = True
        warnings.warn(
            f"lowbit: precision.step() steps the parameters of {len(outside)} converted "
            f"layer{'s' * (len(outside) > 1)} of a model this precision.convert() was not "
            "given (converted by lowbit.convert() alone, or by another Precision): it trains "
            "without what precision.convert() sets up (delayed-scaling histories that move, "
            "fp16's emulated roundings, the layers' part of precision.state_dict()); fix: model "
            "= precision.convert(model) for each model this precision trains (it leaves layers "
            "converted with this recipe as they are)",
            stacklevel=stacklevel,
        )

    def _warn_replaced_layers(self, stacklevel: int) -> None:
        """Warn, once for each, of the layers `convert` swapped that the model has since replaced
        by plain ones (`replaced_by_plain_layers`): transformers' ``resize_token_embeddings``
        gives an untied model a new ``nn.Linear`` output head, and the head trained on in the
        compute dtype, not the recipe's format, without a word. Checked at `wrap_optimizer` (a
        resized model needs a new optimizer for its new Parameters) and at each optimizer's first
        step (`_warn_at_first_steps`)."""
        for index, (model, swapped) in enumerate(zip(self._models, self._swapped)):
            names = replaced_by_plain_layers(model, swapped)
            if not names:
                continue
            swapped.difference_update(names)
            where = f" of model {index + 1} given to precision.convert()" if index else ""
            dtype = str(self.compute_dtype).removeprefix("torch.")
            warnings.warn(
                f"lowbit: layers that precision.convert() converted were replaced since by plain, "
                f"unconverted ones (resize_token_embeddings makes a new output head): "
                f"{', '.join(names)}{where}; they compute in {dtype}, not in recipe "
                f"{self.recipe.name}'s formats; fix: call precision.convert(model) again after "
                "resize_token_embeddings (it converts only the new layers)",
                stacklevel=stacklevel,
            )

    @contextlib.contextmanager
    def own_steps(self):
        """Within, a wrapped optimizer's own ``step()`` is the precision's (`step`'s, or a
        checkpoint's creation of optimizer states at learning rate 0), not refused as a step
        outside `step` (`_refuse_direct_step`)."""
        outer, self._stepping = self._stepping, True
        try:
            yield
        finally:
            self._stepping = outer

    def _direct_step_differs(self) -> str:
        """What a wrapped optimizer's own ``optimizer.step()`` would skip of `step` ("" where it
        steps as `step` does: fp32 parameters, no loss scaling, no amax histories)."""
        if self.scaler.enabled:
            return "it would apply the loss-scaled gradients and take a step that overflowed"
        if self.param_dtype != torch.float32:
            return (
                "it would step the 16-bit weights with 16-bit optimizer states, without the "
                "recipe's master weights or rounding of the update"
            )
        if any(layer.lowbit_state.histories for layer in self._layers().values()):
            return "the delayed-scaling amax histories would not move on"
        return ""

    # --- the loop ----------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: the recipe's autocast (none: a no-op context) on this
        Precision's device type.

        Where that device was taken from a model (`_model_device`), refused when the first
        parameter of each converted model lies on another device type: the model moved after
        `convert` (``model.cpu()`` for a loop of forward passes only, which no `backward` refuses),
        and that device's forward would run without autocast, in fp32. A device given is not
        checked: the user named it, and a model may sit elsewhere between steps (FSDP's CPU
        offloading keeps the parameters on the CPU, moving them to the GPU within each forward).
        Only each model's first parameter (`_first_parameter`), as this runs every step: checking
        them all took about 3 times torch.autocast's own time (`convert` refused a model over
        several device types)."""
        if self.autocast_dtype is None:
            return _NoAutocast()
        here = self.device.type
        if self._device_from == "model":
            firsts = [_first_parameter(model) for model in self._models]
            found = [p.device.type for p in firsts if p is not None and not p.is_meta]
            if found and here not in found:
                self._refuse_other_device("precision.autocast() found the model", found[0])
        return torch.autocast(here, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor, **options) -> None:
        """``loss.backward(**options)`` (``retain_graph``, ``inputs``) on the scaled loss."""
        self._check_loss(loss)
        self._move_scale()
        if self._prepared:
            self._forget_unstepped()
        self._backwards += 1
        self.scaler.scale(loss).backward(**options)
        if self.scaler.enabled:
            optimizers = {id(opt): opt for opt in (*self._optimizers, *self._unwrapped.values())}
            self._marks = {key: _grad_marks(opt) for key, opt in optimizers.items()}

    def _check_loss(self, loss) -> None:
        """Refuse what is not a tensor, and a loss on another kind of device than this
        Precision's where the recipe computes otherwise there: `autocast` is the device's own
        ``torch.autocast``, which leaves a forward on another device as it is (a bf16-mixed
        Precision made for the CPU trained a GPU model in fp32 without a word), fp16 is emulated
        on a CPU only, `convert` routes a model's 16-bit attention for a CPU, and stochastic
        rounding's generator state is the device's (`_computes_alike_anywhere`)."""
        if not isinstance(loss, torch.Tensor):
            raise UsageError(
                f"precision.backward() takes the loss tensor, not a {type(loss).__name__}; fix: "
                "precision.backward(loss), with loss the tensor the loss function returned"
            )
        where, made_for = loss.device.type, self.device.type
        if where in (made_for, "meta"):
            return
        if self._computes_alike_anywhere():
            return
        self._refuse_other_device("precision.backward() got a loss", where)

    def _refuse_other_device(self, found: str, where: str) -> None:
        """Refuse a model or loss found on the device type ``where``, not this Precision's."""
        made_for, name = self.device.type, self.recipe.name
        # a device taken from the model: the model moved after `convert`
        move = (
            f"move the model to {where} before precision.convert(model), or "
            if self._device_from == "model"
            else ""
        )
        raise UsageError(
            f"{found} on {where}, and this Precision computes recipe {name} for {made_for} (its "
            f"autocast is {made_for}'s, which leaves a forward on {where} as it is); fix: {move}"
            f"lowbit.Precision({name!r}, device={where!r})"
        )

    def _move_scale(self) -> None:
        """The loss scale's one move for the steps taken since it last moved."""
        if self._overflowed is not None:
            self.scaler.update(self._overflowed)
            self._overflowed = None

    def _forget_unstepped(self) -> None:
        """A backward after `clip_grad_norm_` without a `step`: the loop skipped the step (say, on
        a gradient spike) or accumulates more gradients. The prepared fp32 copies no longer hold
        the step's gradients and are dropped; gradients that were unscaled in place (fp32
        parameters under loss scaling) cannot take scaled ones on top of them."""
        prepared = [t.grad for stepped, _ in self._prepared.values() for t in stepped]
        self._prepared.clear()
        for optimizer in self._optimizers:
            self.update.release(optimizer)
        if not self.scaler.enabled:
            return
        live = {id(p.grad) for p in self._params() if p.grad is not None}
        if any(id(grad) in live and bool(grad.any()) for grad in prepared):
            raise UsageError(
                "precision.backward() after clip_grad_norm_() without a step: the gradients are "
                "unscaled already and the new ones would be scaled; fix: call "
                "precision.step(optimizer), or optimizer.zero_grad() to skip the step, first"
            )

    def _prepare(self, optimizer, stacklevel: int) -> tuple[list[torch.Tensor], bool]:
        """Once per step of ``optimizer``: the tensors it updates, whose ``.grad`` hold its
        high-precision gradients, unscaled, and whether all of those are finite (decided jointly
        by data-parallel ranks). ``stacklevel``: the user's call's, for a warning."""
        key = id(optimizer)
        if "update" in self._pending:  # param groups added since the state was loaded
            self._apply_pending()
        if self.update.needs_wrapping and all(known is not optimizer for known in self._optimizers):
            # Unwrapped, its master weights and Kahan buffers would be left out of `state_dict`
            # (a resumed run would lose them): a fresh optimizer is wrapped here; one that holds
            # states already (loaded or stepped as a plain optimizer) has them rounded to 16 bits.
            wrapped = {id(p) for p in self._params()}
            if optimizer.state and any(id(p) in wrapped for p in optimizer_params(optimizer)):
                raise UsageError(
                    f"precision got a {type(optimizer).__name__} that a newer optimizer given to "
                    "precision.wrap_optimizer() superseded: the two share parameters, whose master "
                    "weights belong to the newer one; fix: step only the newer optimizer (or give "
                    "each optimizer parameters of its own)"
                )
            if optimizer.state:
                raise UsageError(
                    f"precision got a {type(optimizer).__name__} with states that "
                    "precision.wrap_optimizer() did not see; fix: optimizer = "
                    "precision.wrap_optimizer(optimizer), before its first step and before "
                    "loading its state"
                )
            self.wrap_optimizer(optimizer)
        if key not in self._prepared:
            self._upcast_states(optimizer, stacklevel + 1)  # one stepped without `wrap_optimizer`
            if self.scaler.enabled and not self._backwards:
                self._refuse_unscaled_gradients(optimizer)
            if self.scaler.enabled:
                self._warn_scaled_gradients_changed(optimizer, stacklevel + 1)
                if all(known is not optimizer for known in self._optimizers):
                    # marked from its next backward; a class with __slots__ and no __weakref__
                    # is not (TypeError): at most a missed warning
                    with contextlib.suppress(TypeError):
                        self._unwrapped[key] = optimizer
            stepped = self.update.prepare(optimizer)
            # With no backward since this optimizer's last step, the gradients unscaled in place
            # then (the optimizer's own parameters': not a 16-bit parameter's fresh fp32 copy) are
            # stepped again as they are, as a plain loop's second step takes them; divided again,
            # that step was the scale times too small.
            if self._backward_at_step.get(key) == self._backwards:
                own = {id(p) for p in optimizer_params(optimizer)}
                scaled = [t.grad for t in stepped if id(t) not in own]
                unscaled = [t.grad for t in stepped if id(t) in own]
                finite = self.scaler.unscale_(unscaled, divide=False)
                finite = self.scaler.unscale_(scaled) and finite
            else:
                finite = self.scaler.unscale_([t.grad for t in stepped])
            self._backward_at_step[key] = self._backwards
            # Data-parallel ranks decide jointly, so all of them skip the same steps.
            finite = scale_agreement().all_finite(finite)
            self._prepared[key] = (stepped, finite)
        return self._prepared[key]

    def _warn_scaled_gradients_changed(self, optimizer, stacklevel: int) -> None:
        """Warn, once, where the loss-scaled gradients of ``optimizer`` changed in place between
        `backward` and their unscaling (`_grad_marks`): ``torch.nn.utils.clip_grad_norm_(
        model.parameters(), 1.0)`` there, a loop written for bf16-mixed, measured the norm of the
        scaled gradients (the scale, 65536 at the start, times too large) and cut them to
        ``max_norm`` before the step divided them by the scale, so fp16-mixed's SGD updates were
        that much too small without a word (Adam's normalize it away, all but its eps), as in
        GradScaler's loop without ``unscale_``; with ``max_norm=inf`` (to log the norm) it
        changes no value, but moves the version counters, and the norm it returns is as wrong.
        A warning, not a refusal: a change that is linear in the gradients (a mask, an
        all-reduce, a division) commutes with the scale and is right. An optimizer not given
        to `wrap_optimizer` is marked from the `backward` after its first step or unscaling."""
        if self._changed_warned or self._backward_at_step.get(id(optimizer)) == self._backwards:
            return  # unscaled at this optimizer's last step, with no backward since
        marks, now = self._marks.get(id(optimizer)), _grad_marks(optimizer)
        if not marks or len(now) != len(marks):
            return
        if any(map(_same_mark, marks, now)):  # one end unchanged: no clipping
            return
        self._changed_warned = True
        warnings.warn(
            "lowbit: the gradients changed in place after precision.backward(), while they were "
            f"scaled by recipe {self.recipe.name}'s loss scale (now {self.scaler.value:g}): "
            "measured or clipped then (torch.nn.utils.clip_grad_norm_(model.parameters(), ...)), "
            "their norm was that many times too large, and a clipping by it made the SGD step "
            "that much too small; fix: precision.clip_grad_norm_(optimizer, max_norm) (max_norm "
            "None only measures), or clip the tensors precision.unscale_(optimizer) returns "
            "(said once; a change linear in the gradients, a mask or an all-reduce, is right as "
            "it is)",
            stacklevel=stacklevel,
        )

    def _refuse_unscaled_gradients(self, optimizer) -> None:
        """Refuse gradients that no `backward` made, under loss scaling: ``loss.backward()`` in
        place of ``precision.backward(loss)`` left them unscaled, and the step divided them by the
        loss scale (65536 at the start): fp16-mixed's first update was that much too small, and
        fp16-low's weights never moved."""
        if any(p.grad is not None for p in optimizer_params(optimizer)):
            raise UsageError(
                "precision got gradients that precision.backward() did not make (loss.backward()?):"
                f" recipe {self.recipe.name} scales the loss (now by {self.scaler.value:g}) before "
                "the backward and divides the gradients by that at the step; fix: "
                "precision.backward(loss) in place of loss.backward()"
            )

    def unscale_(self, optimizer) -> list[torch.Tensor]:
        """Unscale the gradients of ``optimizer`` (or of a list of optimizers), as GradScaler's
        ``unscale_``; returns the tensors its next `step` updates, whose ``.grad`` hold them, for
        clipping by hand: ``torch.nn.utils.clip_grad_value_(precision.unscale_(optimizer), 0.5)``.
        For a 16-bit parameter that is its fp32 stand-in (master weight) with an fp32 gradient,
        and the parameter's own 16-bit ``.grad`` is no longer read."""
        return self._unscaled("unscale_", optimizer)

    def _unscaled(self, call: str, optimizer) -> list[torch.Tensor]:
        """`unscale_` for ``precision.<call>()``, whose name a refused argument's error gives."""
        optimizers = _optimizers(call, optimizer)
        self._warn_at_first_steps(optimizers, 4)
        self._refuse_16_bit_parameters(optimizers, call)
        return [t for opt in optimizers for t in self._prepare(opt, 4)[0]]

    def clip_grad_norm_(
        self,
        optimizer,
        max_norm: float | None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """Unscale, then clip the total gradient norm to ``max_norm`` (None: only measure), as
        ``torch.nn.utils.clip_grad_norm_`` does (its arguments after the first, its arithmetic,
        and its result: the total norm as a tensor, before clipping); ``optimizer`` may be a list
        of optimizers, whose gradients are clipped together. The norm is that of the gradients
        the step applies: unscaled, and fp32 (master weights' or stand-ins') for 16-bit
        parameters, so that it does not depend on the recipe's rounding of the gradients.

        The first argument is the optimizer, not ``model.parameters()``: the gradients the step
        reads are those of the tensors the optimizer steps, which are not the model's under
        16-bit parameters."""
        stepped = self._unscaled("clip_grad_norm_", optimizer)
        grads = [t.grad for t in stepped]
        total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
        if hasattr(total, "full_tensor"):  # sharded (FSDP) gradients: the norm over all shards
            total = total.full_tensor()
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(stepped, max_norm, total, foreach)
        return total

    def step(self, *optimizers, closure=None) -> bool:
        """Unscale, check and update (or skip) each optimizer (given one by one, or in lists as to
        `clip_grad_norm_`), roll the delayed-scaling state; True when no step was skipped. The
        loss scale moves before the next `backward`, once for all the steps since (see the
        module's docstring).

        A closure that re-evaluates the loss (LBFGS's), ``precision.step(optimizer, closure)``, is
        passed to the optimizer's step where it steps the model's own fp32 parameters on unscaled
        gradients; elsewhere it is refused (see `_check_closure`)."""
        if optimizers and callable(optimizers[-1]) and not _is_optimizer(optimizers[-1]):
            *optimizers, closure = optimizers
        optimizers = [opt for given in optimizers for opt in _optimizers("step", given)]
        if not optimizers:
            raise UsageError("precision.step() needs the optimizer; fix: precision.step(optimizer)")
        if closure is not None:
            self._check_closure(optimizers)
        else:
            self._check_no_closure(optimizers)
        warn_if_ranks_act_alone(self._acting_alone_differs)
        self._warn_at_first_steps(optimizers, 3)
        self._refuse_16_bit_parameters(optimizers, "step")
        if self._unstepped_load:
            self._warn_kept_now()
        self._unstepped_load = False
        before = self._taken_before_interruption()
        taken = dict(before)
        try:
            with self.own_steps():
                for optimizer in optimizers:
                    if id(optimizer) not in before:
                        taken[id(optimizer)] = self._step_one(optimizer, closure)
        except BaseException:
            self._interrupted_call = (self._backwards, taken)
            raise
        self._interrupted_call = None
        stepped = all(taken.values())
        if not stepped and not self._overflowed:
            self.skipped_steps += 1
        self._overflowed = bool(self._overflowed) or not stepped
        for layer in self._layers().values():
            weight = next(layer.parameters(), None)  # the histories live where the layer computes
            layer.lowbit_state.commit(None if weight is None else weight.device)
        return stepped

    def _step_one(self, optimizer, closure) -> bool:
        """Update (or skip, on an overflow) one optimizer of `step`; whether it was updated."""
        _, finite = self._prepare(optimizer, 4)
        try:
            if finite:
                self.update.step(optimizer, closure)
            else:
                self.update.abort(optimizer)
        finally:
            self._drop_prepared(optimizer)
        return finite

    def _taken_before_interruption(self) -> dict[int, bool]:
        """The optimizers that a `step` interrupted since the last `backward` had stepped (or
        skipped) before the interruption, by id, whether they were updated: its retry
        (``precision.step(og, od)`` again after a Ctrl-C in ``od``'s step) steps only the others.
        Stepped again, ``og`` took the same gradients a second time, unclipped under 16-bit
        parameters (its fp32 copies, clipped, were gone)."""
        if self._interrupted_call is None or self._interrupted_call[0] != self._backwards:
            return {}
        return dict(self._interrupted_call[1])

    def _drop_prepared(self, optimizer) -> None:
        """Forget ``optimizer``'s prepared step once the update has used it, also where an
        interruption came after the optimizer's update (a step post-hook raising, Ctrl-C while
        the 16-bit weights are written): kept, a retried `step` found it prepared while the update
        had dropped its fp32 stand-ins, stepped the 16-bit weights themselves and crashed. A step
        interrupted before the update keeps it, and the retry steps through it. (The closure's
        `backward` may have dropped it already.)"""
        if not self.update.holds_prepared(optimizer):
            self._prepared.pop(id(optimizer), None)

    def _refuse_16_bit_parameters(self, optimizers: list, call: str) -> None:
        """Refuse trainable 16-bit parameters under a recipe of fp32 parameters, before anything
        is unscaled or stepped. `convert` casts them to fp32, but a model cast after it
        (``model.to(torch.bfloat16)``, ``model.half()``) had its optimizer step the 16-bit weights
        without the fp32 ones the recipe promises: updates below half a 16-bit spacing were lost,
        and fp16-mixed's AdamW wrote inf into fp16 weights (its eps, 1e-8, is 0 in fp16). Frozen
        16-bit parameters are the user's to keep (a frozen base under fp32 adapters).

        Under a recipe of 16-bit parameters, those of the other 16-bit dtype are refused alike: a
        bf16-low model cast by ``model.half()`` trained on in fp16 (its range, no loss scaling),
        an fp16-low one cast to bf16 in bf16. (Wider ones step as they are, `LowPrecisionUpdate`'s
        ``_low``: parameters added beside the converted model.)"""
        wrong = {torch.bfloat16, torch.float16} - {self.param_dtype}
        low = next(
            (
                p
                for optimizer in optimizers
                for p in optimizer_params(optimizer)
                if p.requires_grad and p.dtype in wrong
            ),
            None,
        )
        if low is None:
            return
        names = (name for model in self._models for name, p in unwrapped_tensors(model) if p is low)
        name = next(names, "a parameter of the optimizer")
        dtype = str(low.dtype).removeprefix("torch.")
        if self.param_dtype != torch.float32:
            trained = str(self.param_dtype).removeprefix("torch.")
            raise UsageError(
                f"precision.{call}(): {name} is {dtype}, and recipe {self.recipe.name} trains "
                f"{trained} parameters (was the model cast after precision.convert(), e.g. "
                f"model.to(torch.{dtype})?): the optimizer would step {dtype} weights in their "
                f"place; fix: model = precision.convert(model) after the cast, which casts the "
                f"parameters back to {trained}"
            )
        raise UsageError(
            f"precision.{call}(): {name} is {dtype}, and recipe {self.recipe.name} trains fp32 "
            f"parameters (was the model cast after precision.convert(), e.g. "
            f"model.to(torch.{dtype}), or a frozen weight it kept {dtype} unfrozen since?): the "
            f"optimizer would step {dtype} weights without fp32 ones; fix: model = "
            "precision.convert(model) after the cast or the unfreezing, which casts the trained "
            "parameters to fp32"
        )

    def _check_closure(self, optimizers) -> None:
        """A closure re-evaluates the loss on the model while the optimizer moves the tensors it
        steps: under 16-bit parameters those are fp32 stand-ins the model does not read until the
        step ends, and under loss scaling the closure's gradients would reach the optimizer scaled
        (GradScaler refuses closures too)."""
        if len(optimizers) != 1:
            raise UsageError(
                "precision.step() takes a closure with one optimizer; fix: "
                "precision.step(optimizer, closure) for each"
            )
        why = self._closure_refused()
        if why:
            raise UsageError(
                f"precision.step(optimizer, closure) under {self.recipe.name}: {why}; fix: an "
                f"optimizer without a closure, or {_CLOSURE_RECIPES}"
            )

    def _check_no_closure(self, optimizers) -> None:
        """An optimizer whose step takes a closure it cannot do without (LBFGS re-evaluates the
        loss in its line search) failed with PyTorch's "step() missing 1 required positional
        argument: 'closure'"; the fix is lowbit's call, or, where the recipe refuses closures,
        another optimizer or recipe."""
        for optimizer in optimizers:
            if not _step_needs_closure(type(optimizer)):
                continue
            name = type(optimizer).__name__
            why = self._closure_refused()
            fix = (
                f"an optimizer without a closure (AdamW, SGD), or {_CLOSURE_RECIPES} "
                f"({self.recipe.name}: {why})"
                if why
                else "precision.step(optimizer, closure), the closure returning the loss after "
                "optimizer.zero_grad() and precision.backward(loss)"
            )
            raise UsageError(
                f"{name}.step() needs a closure that re-evaluates the loss; fix: {fix}"
            )

    def _acting_alone_differs(self) -> str:
        """What this precision computes differently on a rank of a process group without the
        ranks' agreement (`warn_if_ranks_act_alone`): "" where nothing does."""
        if self.scaler.enabled:
            return (
                "each rank skips its own overflowed steps and backs off its own loss scale, so "
                "DDP/FSDP2 ranks drift apart"
            )
        batch_scaled = (Granularity.TENSOR, Granularity.NVFP4, Granularity.AXIS)
        for layer in self._layers().values():
            for spec in layer.lowbit_state.spec.operands().values():
                if not spec.is_identity and spec.granularity in batch_scaled:
                    return (
                        "each rank scales activations and gradients by its own part of the batch, "
                        "not by the global batch as one process does"
                    )
        return ""

    def _closure_refused(self) -> str:
        """Why this recipe cannot step an optimizer with a closure ("" where it can)."""
        if self.scaler.enabled:
            return "the gradients the closure computes are loss-scaled"
        if self.param_dtype != torch.float32:
            return (
                "the optimizer steps fp32 copies of the 16-bit weights, not the weights the "
                "closure's forward reads"
            )
        return ""

    # --- reporting and state -----------------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        self._move_scale()
        return self.scaler.value

    @property
    def finite_loss_policy(self) -> str:
        """ "skip" where loss scaling can back off from a non-finite loss, "stop" elsewhere."""
        return "skip" if self.scaler.enabled else "stop"

    def state_dict(self) -> dict:
        """Everything the recipe's numerics carry from step to step: the loss scaler, master
        weights or Kahan buffers, the layers' amax histories (and `auto`'s plan), and, where the
        recipe rounds stochastically, the state of torch's generators its draws come from
        (`random_state`), so that a run continued from this state alone draws what the
        uninterrupted run would have drawn.

        Until the first `step` after `load_state_dict`, parts of the loaded state whose optimizer
        or model has not come yet are saved as they were loaded: a save between the load and
        `wrap_optimizer` (a checkpoint converted, a resumed run saved before its first step) lost
        the master weights and Kahan buffers otherwise. From that step on, what has not come is
        no part of the run (param groups come back before the next step) and is not saved."""
        self._move_scale()
        self._apply_pending()  # param groups added since the load take their entries first
        pending = self._pending if self._unstepped_load else {}
        update, sizes = self._update_state(pending)
        layers = {name: layer.lowbit_state.state_dict() for name, layer in self._layers().items()}
        # each layer's spec as it computed, for a resumed one to compare (`_warn_changed_specs`)
        specs = {name: layer.lowbit_state.spec.describe() for name, layer in self._layers().items()}
        state = {
            "recipe": self.recipe.name,
            **_recorded_definition(self.recipe),
            "scaler": self.scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "update": update,
            # where each optimizer's share of the update's parameter indices ends
            "params_per_optimizer": sizes,
            "layers": {**pending.get("layers", {}), **layers},
            "layer_specs": {**pending.get("layer_specs", {}), **specs},
            "layer_names": "unwrapped",  # `lowbit_layers`' (`_legacy_uncompiled`)
        }
        if pending.get("session_42_names") and pending.get("layers"):
            state["layer_names"] = "uncompiled"  # names of a loaded state not renamed yet
        if "rng" in pending:  # restored only once every part has been applied
            state["rng"] = pending["rng"]
        elif self._draws_random():
            state["rng"] = self.random_state()
        return state

    def _update_state(self, pending: dict) -> tuple[dict, list[int] | None]:
        """The update's state (master weights, Kahan buffers) by parameter index, and where each
        optimizer's share of the indices ends, with the loaded entries not handed on yet in their
        places: an optimizer not wrapped again keeps its saved share, and one wrapped with fewer
        parameters than it was saved with (param groups to be added) keeps the saved entries past
        its own. A state saved without its optimizers' sizes stays without them."""
        present = [optimizer_params(optimizer) for optimizer in self._optimizers]
        if "update" not in pending:
            return self.update.state_dict([p for params in present for p in params]), [
                len(params) for params in present
            ]
        entries, sizes = pending["update"], pending["params_per_optimizer"]
        entries = {part: entries.get(part, {}) for part in self.update.parts}
        update = {part: {} for part in self.update.state_dict([])}
        if sizes is None:
            if not present:
                return {**update, **entries}, None
            # as `_apply_pending_update` splits it: the last optimizer takes the rest
            sizes = [len(params) for params in present[:-1]] + [sys.maxsize]
        saved_start = start = 0
        out_sizes = []
        for index in range(max(len(present), len(sizes))):
            params = present[index] if index < len(present) else []
            saved = sizes[index] if index < len(sizes) else 0
            for part, values in self.update.state_dict(params).items():
                update[part].update({start + i: v for i, v in values.items()})
            for part, values in entries.items():  # this share's entries not handed on
                first, end = saved_start + len(params), saved_start + saved
                update[part].update(
                    {start + i - saved_start: v for i, v in values.items() if first <= i < end}
                )
            size = max(len(params), saved)
            out_sizes.append(size)
            saved_start, start = saved_start + saved, start + size
        return update, out_sizes if pending["params_per_optimizer"] is not None else None

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s pieces; master weights, Kahan buffers and layer states whose
        optimizer or model is not wrapped or converted yet are applied when it is. The generators'
        state of a stochastically rounding recipe is restored once every piece has been applied,
        so that building a model after loading does not consume the restored stream.

        A state saved under another recipe loads with a warning naming both: switching recipes on
        purpose (a bf16-mixed run continued in fp8) is legitimate, so it is not refused, but what
        this recipe keeps no place for (the other's fp32 master weights) is dropped silently
        otherwise, and the run would continue from the model's rounded weights unawares."""
        if not isinstance(state, dict) or "scaler" not in state:
            # (a whole checkpoint, or the model's or optimizer's state, failed with KeyError 'scaler')
            given = (
                f"a dict of {', '.join(map(str, list(state)[:6])) or 'nothing'}"
                if isinstance(state, dict)
                else f"a {type(state).__name__}"
            )
            raise UsageError(
                f"precision.load_state_dict() takes what precision.state_dict() returned, not "
                f"{given}; fix: save precision.state_dict() in the checkpoint and load that part, "
                "e.g. precision.load_state_dict(checkpoint['precision'])"
            )
        saved = state.get("recipe")
        if saved is not None and saved != self.recipe.name:
            warnings.warn(
                f"lowbit: precision.load_state_dict(): the state was saved under recipe {saved}, "
                f"this Precision's is {self.recipe.name}: what of it {self.recipe.name} keeps no "
                "place for (master weights, Kahan buffers, a loss scale, amax histories) is "
                "dropped, and training continues from the model's weights as they are; fix: a "
                f"Precision({saved!r}) to continue that run's numerics",
                stacklevel=2,
            )
        if saved == self.recipe.name:  # another recipe's was warned about above
            self._check_definition(state)
        self._overflowed = None
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        # (session 42 wrote "uncompiled": the same names but for DDP's and DataParallel's
        # ``module`` parts, which `_rename_session_42_layers` drops)
        recorded = state.get("layer_names") in ("uncompiled", "unwrapped")
        uncompiled = str if recorded else _legacy_uncompiled
        self._pending = {
            "update": state.get("update", {}),
            "params_per_optimizer": state.get("params_per_optimizer"),
            "layers": {uncompiled(name): v for name, v in state.get("layers", {}).items()},
            "session_42_names": state.get("layer_names") != "unwrapped",
        }
        if "layer_specs" in state:  # absent from a state saved before lowbit recorded them
            specs = state["layer_specs"]
            self._pending["layer_specs"] = {uncompiled(name): v for name, v in specs.items()}
            self._pending["told_converted"] = set()  # layers converted now, kept then, warned of
        if "rng" in state:
            self._pending["rng"] = state["rng"]
        self._unstepped_load = True
        self._apply_pending()

    def __reduce_ex__(self, protocol):
        """Refuse pickling (``torch.save`` of a checkpoint that holds the Precision itself) in one
        line with the fix: it failed deep inside pickle with "cannot pickle
        'weakref.ReferenceType' object", and an unpickled copy would hold optimizers without
        what `wrap_optimizer` set up on them (``Optimizer.__getstate__`` keeps no hooks). Its
        state is `state_dict`, as a module's and an optimizer's are."""
        raise UsageError(
            "a lowbit.Precision is not pickled (torch.save of it, or of a checkpoint holding it); "
            "its state is precision.state_dict(); fix: torch.save({..., 'precision': "
            "precision.state_dict()}, path), then precision.load_state_dict(checkpoint"
            "['precision']) into a new Precision of the same recipe"
        )

    def __copy__(self) -> Precision:
        """Python's own shallow copy (``copy.copy(precision)``), which `__reduce_ex__` would
        refuse: the copy shares every part with the original, as before that refusal."""
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict) -> Precision:
        """Python's own deep copy, which `__reduce_ex__` would refuse: a copy of a run in memory,
        ``copy.deepcopy((model, optimizer, precision))``, continues as the run does."""
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def _draws_random(self) -> bool:
        """Whether the numerics draw random numbers (stochastic rounding of the update, or of an
        operand of any converted layer, `auto`'s present plan included)."""
        if self.recipe.update_rounding is UpdateRounding.STOCHASTIC:
            return True
        return any(
            operand.rounding is Rounding.STOCHASTIC
            for layer in self._layers().values()
            for operand in layer.spec.operands().values()
        )

    def random_state(self) -> dict:
        """The generators stochastic rounding draws from: torch's CPU generator (the seed of every
        counter-based draw, `lowbit.formats.counter_rng`, on any device) and, on a GPU, that
        device's (bf16 rounding there draws its random bits directly)."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_random_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _check_definition(self, state: dict) -> None:
        """Refuse a state saved under this recipe's name by a recipe that computed otherwise.

        A user's recipe is compared field by field (`_definition`): resumed, a run of a recipe
        registered again with other formats (or a process that registered another recipe under
        the name) continued in other numerics without a word. A built-in preset changed in place
        (``dataclasses.replace(get_recipe('bf16-mixed'), param_dtype='bf16', ...)``) keeps the
        preset's name too, and a state saved by it loaded into the preset (or the other way
        round) without a word, the preset's fp32 parameters dropping the other's master weights;
        so its changes from the preset are compared (`_preset_changes`), and a state that
        records none (saved before lowbit recorded them) is taken as it is.

        Refused, not warned of, as a user's recipe is: the name claims the numerics the state
        was saved with, and the way to switch on purpose stays open, under a name of its own (a
        state loaded into another recipe is warned of, `load_state_dict`). Left out of a
        preset's comparison are the options a run sets on top of a preset, which the trainer
        checks on resume itself (`check_resume_config`) and a library user may change on
        purpose: the overrides (``--override``, `Recipe.with_overrides`), whose layers in other
        formats than the state's, converted or kept, are warned of (`_warn_changed_specs`,
        `_warn_kept_now`), and the loss scale's
        start and growth interval (``--loss-scale``, ``--loss-scale-growth-interval``), whose
        scale the state's replaces. A run resumed with the options it was trained with resumes
        silently, as before."""
        name = self.recipe.name
        built_in = is_built_in(name)
        key = "preset_changes" if built_in else "definition"
        computed = state.get(f"{key}_computed")  # absent from a state saved before session 36
        saved = computed if isinstance(computed, dict) else state.get(key)
        if not isinstance(saved, dict):
            return
        if not built_in:
            changed = _changed_fields(saved, self.recipe, exact=computed is saved)
            if changed:
                raise UsageError(
                    f"the precision state was saved under recipe {name!r} as it was defined "
                    f"then, and this Precision's {name!r} differs in {', '.join(changed)}; fix: "
                    "register the recipe as it was when the run trained, or give the new one "
                    "another name (and start a new run)"
                )
            return
        preset = _preset_definition(name, _definition)
        changed = _changed_fields(saved, self.recipe, preset, exact=computed is saved)
        if changed:
            then = f"{name} changed in {', '.join(saved)}" if saved else f"the preset {name}"
            raise UsageError(
                f"the precision state was saved under {then}, and this Precision's {name} "
                f"differs from it in {', '.join(changed)}; fix: load it into the recipe it was "
                f"saved under, or give one of the two a name of its own ({own_name_fix(name)}) "
                "to switch recipes on purpose (warned of)"
            )

    def _apply_pending(self) -> None:
        """Hand the loaded state's parts to the models and optimizers there are now.

        Master weights and Kahan buffers go to the parameters that are there; each later call (an
        optimizer wrapped, a param group added before the next step) hands on only the entries of
        the parameters that came since, so that masters a step has moved are not loaded again."""
        if "update" in self._pending and self._optimizers:
            self._apply_pending_update()
        self._rename_session_42_layers()
        layers = self._pending.get("layers", {})
        present = self._layers()
        loaded = {name: layer for name, layer in present.items() if name in layers}
        self._warn_changed_specs(present, layers)
        for name, layer in loaded.items():
            layer.lowbit_state.load_state_dict(layers.pop(name))
        if "rng" in self._pending and "update" not in self._pending and not layers:
            self._set_random_state(self._pending.pop("rng"))

    def _rename_session_42_layers(self) -> None:
        """Name the layers of a loaded state saved by lowbit's session 42 or older as the models
        converted now do (`session_42_layer_names`): those states kept DDP's ``module`` parts,
        so a run converted as ``precision.convert(DDP(model))`` lost fp8-delayed's amax
        histories on resuming, into the same ``DDP(model)`` too, with a warning that its layers
        had been kept. Names already unwrapped stay as they are."""
        if not self._pending.get("session_42_names"):
            return
        renamed = {}
        for index, model in enumerate(self._models):
            prefix = f"{index}:" if index else ""
            names = session_42_layer_names(model).items()
            renamed.update({prefix + old: prefix + new for old, new in names})
        for part in ("layers", "layer_specs"):
            if renamed and part in self._pending:
                saved = self._pending[part]
                self._pending[part] = {renamed.get(name, name): v for name, v in saved.items()}

    def _warn_changed_specs(self, present: dict[str, LowbitModule], layers: dict) -> None:
        """Warn, once for the layers loaded now (those of ``present`` with an entry in
        ``layers``), of those whose spec is not the one they were saved with (`state_dict`'s
        ``layer_specs``), and of the layers converted now that the state's model kept (absent
        from its specs; the saved-converted, kept-now ones are told at the first step,
        `_warn_kept_now`): under other overrides than the state's, or where several overrides
        match one layer, read operand by operand since lowbit's session 32 (the first match
        decided the whole layer before), a resumed run computed in other formats without a word.
        A state saved before specs were recorded is suspect where two or more overrides decide a
        layer (`Recipe.deciding_overrides`). A warning, not a refusal: a library user may load a
        state under other overrides on purpose. `auto`'s layers are left out: their plan moves
        during training and is restored with the state (`LayerState.load_state_dict`). A second
        model of which the state has no converted layer (one converted after the load that the
        saved run did not have) is no change."""
        saved_specs = self._pending.get("layer_specs")
        # the saved run's models: the first one, and the others it converted a layer of
        saved_models = {"", *(_model_of(name) for name in saved_specs or ())}
        told = self._pending.get("told_converted", set())
        changed = []
        for name, layer in present.items():
            state = layer.lowbit_state
            if state.dynamic_spec or (name in layers and "spec" in layers[name]):
                continue
            now = state.spec.describe()
            if name in layers and saved_specs is None:
                deciding = self.recipe.deciding_overrides(name.split(":", 1)[-1])
                if len(deciding) > 1:
                    which = " and ".join(o.reason.removeprefix("override ") for o in deciding)
                    changed.append(
                        f"{name} (saved before lowbit recorded specs; decided by {which})"
                    )
            elif name in layers and saved_specs.get(name, now) != now:
                changed.append(f"{name} (saved: {saved_specs[name]}; now: {now})")
            elif (
                name not in layers
                and saved_specs is not None
                and name not in saved_specs
                and name not in told
                and _model_of(name) in saved_models
                and not self._device_decides(now)
            ):
                told.add(name)
                changed.append(f"{name} (saved: kept; now: {now})")
        self._warn_other_formats(changed, saved_specs is None, stacklevel=5)

    def _warn_kept_now(self) -> None:
        """At the first step after `load_state_dict`, where what has not come is no part of the
        run (`state_dict`): warn of the layers the state's model converted that this one keeps
        (their saved states still pending), as `_warn_changed_specs` warns of the converse. The
        layers of a model not converted (a saved run's second model this run does without) are
        not kept layers."""
        saved_specs = self._pending.get("layer_specs") or {}
        models = {str(index) if index else "" for index in range(len(self._models))}
        changed = [
            f"{name} (saved: {saved_specs.get(name, 'converted')}; now: kept)"
            for name in self._pending.get("layers", {})
            if _model_of(name) in models
            # on a GPU an fp16 recipe's layers compute under fp16 autocast, kept or not
            and (self.emulates_fp16 or not self._device_decides(saved_specs.get(name)))
        ]
        self._warn_other_formats(changed, False, stacklevel=4)

    def _device_decides(self, spec: str | None) -> bool:
        """Whether ``spec`` is an fp16 recipe's own layer spec, which a CPU converts (emulated
        fp16) and a GPU keeps (fp16 autocast computes it, as it computes a kept layer there,
        `convert`): such a layer converted now but kept in a state saved on a GPU is no change."""
        layer = self.recipe.layer
        emulated = self.recipe.emulate_fp16_gemms_on_cpu and layer is not None
        return emulated and spec == layer.describe()

    def _warn_other_formats(self, changed: list[str], suspect: bool, stacklevel: int) -> None:
        """One warning for the layers ``changed`` names (its first, and how many more), whose
        formats differ from the loaded state's (``suspect``: may differ)."""
        if not changed:
            return
        others = len(changed) - 1
        more = f" and {others} more layer{'s' * (others > 1)}" if others else ""
        verb = "may compute" if suspect else "compute" if others else "computes"
        warnings.warn(
            f"lowbit: precision.load_state_dict(): layer {changed[0]}{more} {verb} in other "
            "formats than when the state was saved: its overrides differ from the ones it was "
            "saved with, or several overrides match one layer, which are read operand by operand "
            "(first match per operand) since session 32, where the first match decided the whole "
            "layer before; fix: keep the overrides the state was saved with (those that decide "
            "these operands first), or start a new run",
            stacklevel=stacklevel,
        )

    def _apply_pending_update(self) -> None:
        """The loaded master weights and Kahan buffers, keyed by their parameter's position in the
        saved optimizers' parameters one after the other, go to each optimizer's own parameters:
        a param group added to one optimizer after the load (progressive unfreezing) takes its
        entries without shifting those of the optimizers after it. A state saved without its
        optimizers' sizes splits at the present optimizers' sizes (the last one takes the rest)."""
        entries, sizes = self._pending["update"], self._pending["params_per_optimizer"]
        done = self._pending.setdefault("update_done", {})  # optimizer index -> params given theirs
        start, given = 0, set()  # the first saved index of each optimizer's share; handed indices
        for index, optimizer in enumerate(self._optimizers):
            params = optimizer_params(optimizer)
            if sizes is not None:
                size = sizes[index] if index < len(sizes) else 0
            else:
                size = len(params) if index < len(self._optimizers) - 1 else sys.maxsize
            first, present = done.get(index, 0), start + min(size, len(params))
            self.update.load_state_dict(
                {
                    part: {i - start - first: v for i, v in values.items() if start + first <= i}
                    for part, values in entries.items()
                },
                params[first:size],
            )
            given.update(range(start, present))
            done[index] = len(params)
            start += size
        if all(i in given for values in entries.values() for i in values):
            for key in ("update", "params_per_optimizer", "update_done"):
                del self._pending[key]


def _rotary_buffers(model: torch.nn.Module) -> dict[tuple[torch.nn.Module, str], torch.Tensor]:
    """The rotary embeddings' inverse frequencies of a Hugging Face model, which `convert` leaves
    as they are (fp32, as transformers makes them) under 16-bit parameters, by (module, buffer
    name): floating buffers named ``inv_freq`` or ``..._inv_freq`` (``original_inv_freq``, Gemma
    3's ``sliding_attention_inv_freq``) of modules that the transformers package defines (not
    ``transformers_modules``: a ``trust_remote_code`` model's own code, whose forwards lowbit
    cannot know).

    The angle of position p is ``p * inv_freq``: rounded to bf16 (8 significant bits) a frequency
    is off by up to 2^-9 of itself, and the angle by p times that, so a Llama's cos/sin (head dim
    64) were off by up to 0.86 at position 2047 (tests/precision/test_device_and_buffers_s37.py).
    ``from_pretrained(..., dtype=torch.bfloat16)`` leaves them in fp32 (they are computed in
    fp32 explicitly), and transformers' rotary forwards compute cos/sin from them in fp32 and cast
    the result to the activations' dtype, so that keeping them changes no other dtype. Not every
    non-persistent buffer: a sinusoidal position table (M2M100's ``weights``) is added to the
    hidden states, and kept in fp32 it turned them to fp32, which a 16-bit layer norm refuses.
    Other modules' buffers are cast, as ``model.to`` casts them: lowbit cannot know how their
    forwards use them."""
    return {
        (module, name): buffer
        for module in model.modules()
        if type(module).__module__.split(".")[0] == "transformers"
        for name, buffer in module._buffers.items()
        if buffer is not None
        and buffer.is_floating_point()
        and (name == "inv_freq" or name.endswith("_inv_freq"))
    }


class _NoAutocast(contextlib.ContextDecorator, contextlib.nullcontext):
    """`Precision.autocast` of a recipe without autocast: a no-op context that, as
    ``torch.autocast`` does, also decorates (``@precision.autocast()`` on a forward worked under
    bf16-mixed and failed with "'nullcontext' object is not callable" under fp32 and fp16-low)."""


def _grad_marks(optimizer) -> list[tuple[int, int | torch.Tensor]]:
    """Marks (`_grad_mark`) of the gradients of the first and the last parameter of ``optimizer``
    that have one; none where fewer than two have one. A clipping (``clip_grad_norm_``,
    ``clip_grad_value_``) writes into every gradient, a mask (a new token's embedding rows) or an
    injected value rarely into both ends. Two, not all: `Precision.backward` reads them at every
    call."""
    groups = optimizer.param_groups
    forward = (p for group in groups for p in group["params"] if p.grad is not None)
    backward = (p for group in reversed(groups) for p in reversed(group["params"]))
    first = next(forward, None)
    last = next((p for p in backward if p.grad is not None), None)
    if first is None or first is last:
        return []
    return [_grad_mark(p.grad) for p in (first, last)]


_SAMPLED = 64  # values of a gradient `_grad_mark` keeps where its version counter tells nothing


def _grad_mark(grad: torch.Tensor) -> tuple[int, int | torch.Tensor]:
    """The identity of ``grad`` and its version counter, which every in-place op moves; or, where
    that counter is not the gradient's own, up to `_SAMPLED` of its (local) values spread over
    it, copied. A view's counter is its base's, which every other view moves: DDP's
    ``gradient_as_bucket_view=True`` makes each gradient a view of its bucket, and a mask on one
    gradient moved the counters of the rest of the bucket (the two ends changed, and a false
    warning). In-place ops on a DTensor (FSDP2's gradients) move no counter, the DTensor's nor
    its local shard's (torch 2.13). Values miss a clipping of the sampled ones by a factor that
    leaves them all as they were (zeros; ``max_norm=inf``), which at most misses a warning."""
    local = local_values(grad)
    if grad._base is None and not hasattr(grad, "full_tensor"):
        return id(grad), local._version
    flat = local.reshape(-1)
    return id(grad), flat[:: max(1, flat.numel() // _SAMPLED)][:_SAMPLED].clone()


def _same_mark(then: tuple[int, int | torch.Tensor], now: tuple[int, int | torch.Tensor]) -> bool:
    """Whether two `_grad_mark` are of one gradient, unchanged; values compared by their bits
    (an overflow's NaN is the same NaN)."""
    if then[0] != now[0] or type(then[1]) is not type(now[1]):  # (an id reused: another tensor)
        return False
    if isinstance(then[1], torch.Tensor):
        return torch.equal(then[1].view(torch.uint8), now[1].view(torch.uint8))
    return then[1] == now[1]


def _first_parameter(module: torch.nn.Module) -> torch.nn.Parameter | None:
    """``next(module.parameters(), None)`` without the set-up of its generators (of
    `named_modules`, which tracks every module visited): 0.9 us against 7.2 us for a 2-layer
    Llama, by timeit (`autocast` runs it every step)."""
    for param in module._parameters.values():
        if param is not None:
            return param
    for child in module._modules.values():
        if child is not None and (param := _first_parameter(child)) is not None:
            return param
    return None


def _legacy_uncompiled(name: str) -> str:
    """A `Precision._layers` name of a state saved before `state_dict` recorded its names as
    the unwrapped model's (``layer_names``): without its ``_orig_mod`` parts, which a compiled
    model's names had."""
    model, colon, layer = name.rpartition(":")
    return model + colon + ".".join(part for part in layer.split(".") if part != "_orig_mod")


def _model_of(layer: str) -> str:
    """Which converted model a `Precision._layers` name is of: its prefix (the first model's
    names have none)."""
    return layer.partition(":")[0] if ":" in layer else ""


def _definition(recipe: Recipe) -> dict[str, str]:
    """What a recipe computes, field by field (its texts left out), as `Precision.state_dict`
    records it for a user's recipe (``definition_computed``): a registered recipe is found by its
    name alone, and the name may be registered again with other numerics before a run resumes.
    Each field is the repr of its value as it computes (`_as_computed`), so that equal
    definitions are one: a recipe that writes out a default its preset leaves unsaid
    (``grad_dtype='fp32'`` of fp32 parameters, an MX operand without the preset's explicit floor
    rule) was refused a state its preset saved, compared by the repr of what was written."""
    values = _fields(recipe)
    values["grad_dtype"] = recipe.grad_dtype or recipe.param_dtype  # None: the parameters'
    return {name: repr(_as_computed(value)) for name, value in values.items()}


def _as_written(recipe: Recipe) -> dict[str, str]:
    """A recipe's fields as states record them under ``definition`` (and a preset's changes under
    ``preset_changes``) as lowbit did before session 36: the repr of each value as written, which
    a lowbit from before compares with its recipe's (it refused the form `_definition` gives), so
    a state saved now loads there too. Alone in a state saved before, matched by the recipe as it
    is written (`_changed_fields`)."""
    return {name: repr(value) for name, value in _fields(recipe).items()}


def _fields(recipe: Recipe) -> dict:
    texts = ("name", "description", "reference")
    return {f.name: getattr(recipe, f.name) for f in fields(recipe) if f.name not in texts}


def _as_computed(value):
    """A recipe field's value as plain data that two values share exactly when they compute
    alike: an operand's block and scale rule with the defaults it leaves unsaid written out
    (`block_shape`: MX's 1x32, NVFP4's 1x16, a 2-D block's side as rows x columns;
    `default_rule`: MX's floor, amax otherwise; a plain cast and NVFP4 take none), enum members
    as their values, numbers as Python's int or float (numpy's ``int64(32)`` is 32), lists as
    tuples."""
    if isinstance(value, OperandSpec):
        computed = {f.name: getattr(value, f.name) for f in fields(value)}
        if value.granularity not in (Granularity.TENSOR, Granularity.AXIS):
            computed["block_size"] = block_shape(value.granularity, (1, 1), value.block_size)
        if not (value.is_plain_cast or value.granularity is Granularity.NVFP4):
            computed["scale_rule"] = value.scale_rule or default_rule(value.granularity)
        return ("OperandSpec", tuple((k, _as_computed(v)) for k, v in computed.items()))
    if is_dataclass(value) and not isinstance(value, type):
        parts = tuple((f.name, _as_computed(getattr(value, f.name))) for f in fields(value))
        return (type(value).__name__, parts)
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, tuple | list):
        return tuple(map(_as_computed, value))
    return value


# What a state saved under a preset's name leaves out of the preset's changes it records besides
# `_definition`'s texts (`_check_definition` says why): the options a run sets on top of a preset
_NOT_PRESET_CHANGES = ("overrides", "initial_loss_scale", "loss_scale_growth_interval")


def _preset_changes(recipe: Recipe, definition=_definition) -> dict[str, str]:
    """The fields in which ``recipe``, under a built-in preset's name, differs from that preset,
    both given by ``definition`` (`_definition`: as they compute, ``preset_changes_computed``;
    `_as_written`: as written, ``preset_changes``), less `_NOT_PRESET_CHANGES`: none for the
    preset itself or one with ``--override`` and ``--loss-scale``, and as they compute none for
    one that writes out the preset's defaults. Relative to the preset, so that a preset that a
    later release of lowbit defines otherwise still resumes a run saved under it."""
    preset = _preset_definition(recipe.name, definition)
    return {
        field: value
        for field, value in definition(recipe).items()
        if field not in _NOT_PRESET_CHANGES and preset.get(field) != value
    }


def _preset_definition(name: str, definition) -> dict[str, str]:
    try:
        return definition(get_recipe(name))
    except UsageError:  # a name lowbit reserves but does not define (``auto:fp2``)
        return {}


def _changed_fields(
    saved: dict, recipe: Recipe, preset: dict[str, str] | None = None, exact: bool = True
) -> list:
    """The fields in which ``recipe`` differs from the definition a state recorded: ``saved``,
    a user's recipe's `_definition`, or with ``preset`` (the preset's `_definition`) a preset's
    changes, a field they leave out being the preset's. A recorded field matches the recipe as it
    computes; ``exact=False``, for a state that records only the form read before session 36
    (``definition``, ``preset_changes``), as it is written (`_as_written`) too, or as it computes
    (as lowbit recorded it there for a while in session 36, before the ``_computed`` keys). A field a user's recipe's
    state does not record (added to `Recipe` since) matches."""
    now, written = _definition(recipe), _as_written(recipe)
    changed = []
    for field, value in now.items():
        if preset is not None and field in _NOT_PRESET_CHANGES:
            continue
        if field in saved:
            same = saved[field] == value or (not exact and saved[field] == written[field])
        else:
            same = preset is None or preset.get(field) == value
        if not same:
            changed.append(field)
    return changed


def _recorded_definition(recipe: Recipe) -> dict:
    """What `Precision.state_dict` records of its recipe beside the name (checked by
    `Precision._check_definition`): a user's recipe's fields, a preset's `_preset_changes`,
    each as written (`_as_written`, which a lowbit from before session 36 reads) and as they
    compute (`_definition`, under the key ending ``_computed``)."""
    if is_built_in(recipe.name):
        return {
            "preset_changes": _preset_changes(recipe, _as_written),
            "preset_changes_computed": _preset_changes(recipe),
        }
    return {"definition": _as_written(recipe), "definition_computed": _definition(recipe)}


def _guard_steps(optimizer, precision: Precision) -> None:
    """Register `_refuse_direct_step` on ``optimizer``, replacing an earlier precision's guard (a
    loop that built a new Precision for the same optimizer). An optimizer that does not take step
    hooks (a user's duck-typed one, a wrapper that skips ``Optimizer.__init__``) goes unguarded:
    the guard is a safety net, not a condition of stepping."""
    if not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        return
    earlier = getattr(optimizer, "_lowbit_step_guard", None)
    if earlier is not None:
        earlier.remove()
    optimizer._lowbit_step_guard = optimizer.register_step_pre_hook(_refuse_direct_step(precision))


def _refuse_direct_step(precision: Precision):
    """A step pre-hook for an optimizer `Precision.wrap_optimizer` wrapped: its own ``step()``,
    outside `Precision.step`, is refused where it would silently step otherwise (loss-scaled
    gradients, 16-bit weights without their master weights, delayed scaling that never moves on);
    a loop that stepped so under bf16-mixed would break unnoticed in another recipe. The precision
    is held weakly: the optimizer does not keep it alive."""
    owner = weakref.ref(precision)

    def refuse(optimizer, args, kwargs) -> None:
        precision = owner()
        if precision is None or precision._stepping:
            return
        why = precision._direct_step_differs()
        if why:
            raise UsageError(
                f"{type(optimizer).__name__}.step() of an optimizer precision.wrap_optimizer() "
                f"wrapped, outside precision.step(), under {precision.recipe.name}: {why}; fix: "
                "precision.step(optimizer)"
            )

    return refuse


@functools.cache
def _step_needs_closure(optimizer_class: type) -> bool:
    """Whether ``optimizer_class.step`` has a ``closure`` without a default (LBFGS); read once per
    class, not at every step. A ``step`` that cannot be inspected (a compiled wrapper) needs none
    as far as lowbit can tell: its own error stands."""
    try:
        closure = inspect.signature(optimizer_class.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


# The layers whose weights autocast casts to its dtype in their forward (exactly these types: a
# subclass may use its weight otherwise)
_AUTOCAST_GEMMS = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
)

# The recipes that step an optimizer with a closure (`Precision._closure_refused`)
_CLOSURE_RECIPES = (
    "a recipe with fp32 parameters and no loss scaling (fp32, bf16-mixed, the fp8, MX and int8 "
    "presets)"
)


def _is_optimizer(candidate) -> bool:
    """Anything with ``param_groups`` steps as an optimizer (torch's, torchao's, a user's own)."""
    return hasattr(candidate, "param_groups")


def _supersedes(new: set[int], old: set[int], in_models: set[int]) -> bool:
    """Whether an optimizer over the parameters ``new`` (ids) replaces one over ``old``: they
    share a parameter, and each of the old one's is the new one's or no longer in a model given
    to `Precision.convert` (``in_models``; the output head ``resize_token_embeddings`` replaced).
    So rebuilding an optimizer (after a resize, or to unfreeze layers) replaces the old one, and
    an optimizer over a part of the model (a head-only probe) leaves the main one be."""
    return bool(new & old) and all(p in new or p not in in_models for p in old)


def _optimizers(call: str, given) -> list:
    """The optimizers ``given`` to ``precision.<call>()``: one, or a list or tuple of them. What is
    not an optimizer is refused in one line: ``clip_grad_norm_(model.parameters(), 1.0)``, the
    arguments of ``torch.nn.utils.clip_grad_norm_``, failed deep inside with an AttributeError."""
    optimizers = list(given) if isinstance(given, (list, tuple)) else [given]
    for candidate in optimizers:
        if not _is_optimizer(candidate):
            raise UsageError(
                f"precision.{call}() takes the optimizer (or a list of optimizers), not a "
                f"{type(candidate).__name__}; fix: precision.{call}(optimizer"
                + (", max_norm)" if call == "clip_grad_norm_" else ")")
            )
    return optimizers
