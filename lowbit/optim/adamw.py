"""Adam/AdamW with fp32, bf16, fp8, 8-bit or 4-bit states; `build_optimizer` picks one.

- ``fp32``: ``torch.optim.AdamW`` / ``Adam`` (the reference).
- ``fp8`` / ``8bit`` / ``4bit``: torchao's ``AdamWFp8`` / ``AdamW8bit`` / ``AdamW4bit`` (and the
  Adam variants): the state tensors are torchao tensor subclasses that quantize on write and
  dequantize on read; the update itself runs in fp32 (torchao's ``single_param_adam``). lowbit
  changes four things: the fp32-states rule is decided on the global tensor (see
  `keeps_fp32_states`), a block is scaled by its largest value however small (torchao floors
  the scale at 1e-12, which coarsened the moments of small gradients: `_block_scales`), the
  step runs eagerly unless ``compile=True`` (torchao always calls
  ``torch.compile``, which on a CPU costs tens of seconds per parameter shape), and Adam's
  ``amsgrad`` and ``maximize`` are refused (as by the bf16 states), not ignored, as are complex
  and fp64 parameters and sparse gradients (`_RealDenseOnly`). The arithmetic
  is torchao's, with its known limits (docs/memory.md): a positive second moment that the fp8 or
  8-bit block quantization rounds to 0 under a nonzero first moment makes the next update
  ``lr * m / eps`` (the zero-point problem that 4-bit's zero-free map avoids, Li et al. 2023), and
  a gradient whose square overflows fp32 makes its block NaN.
- ``bf16``: `AdamWBf16States`, written here because no library offers it: torchao rounds only the
  *parameter* to bf16 stochastically (``bf16_stochastic_round``), not the states. Moments are
  updated in fp32 and written back to bf16 with stochastic rounding, so small increments to
  ``v`` (``(1 - beta2) * g**2`` is ~1e-3 of ``v``, below bf16's relative spacing 2**-8) survive in
  expectation instead of being rounded away.

Every optimizer works with `lowbit.Precision`: during ``Precision.step`` the optimizer's param
groups hold an fp32 stand-in for each 16-bit parameter (its master weight, or an upcast copy), so
the states are created from fp32 data. Its
``state_dict()`` loads into a fresh optimizer with the bf16, fp8, 8-bit and 4-bit states' dtypes
kept (plain ``torch.optim.Optimizer.load_state_dict`` would cast bf16 moments to the fp32 stand-in's
dtype); fp32 states are placed in the parameter's dtype, as torch's update reads them.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lowbit.errors import UsageError, choose, warn
from lowbit.formats import cast
from lowbit.optim.states import BLOCK_SIZE, StatePrecision, keeps_fp32_states
from lowbit.optim.states import state_precision as _state_precision
from lowbit.recipes.recipe import dtype_name

OPTIMIZERS = ("adamw", "adam")


def check_saved_groups(optimizer: Optimizer, state_dict) -> None:
    """Refuse, in one line, what ``optimizer.load_state_dict`` cannot take: what is not an
    optimizer's ``state_dict()`` (a model's, a whole checkpoint), or one saved with other param
    groups (another count of groups, or of parameters in a group).

    Checked by the load's pre-hooks, before any of them changes the optimizer: torch refuses these
    only after the pre-hooks ran, with a ValueError or KeyError, and `lowbit.Precision`'s pre-hook
    had put fp32 stand-ins into the param groups by then, which no post-hook took out again: a
    loop that went on after the refused load stepped the stand-ins, and the model never moved."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        given = (
            f"a dict of {', '.join(map(str, list(state_dict)[:6])) or 'nothing'}"
            if isinstance(state_dict, dict)
            else f"a {type(state_dict).__name__}"
        )
        raise UsageError(
            f"optimizer.load_state_dict() takes what optimizer.state_dict() returned, not {given}; "
            "fix: load the optimizer's part of the checkpoint, e.g. "
            "optimizer.load_state_dict(checkpoint['optimizer'])"
        )
    saved = [len(group["params"]) for group in state_dict["param_groups"]]
    present = [len(group["params"]) for group in optimizer.param_groups]
    if saved != present:
        raise UsageError(
            f"the saved optimizer state has param groups of {saved} parameters, this "
            f"{type(optimizer).__name__} has {present}; fix: load the optimizer state saved with "
            "these param groups (the same parameters in the same groups and order), or start "
            "without the saved optimizer state"
        )


def _keep_state_dtypes_on_load(optimizer: Optimizer) -> None:
    """Make ``load_state_dict`` keep the saved moments' dtypes where the update is lowbit's or
    torchao's (moved to the param's device), refuse states saved in another state precision or
    with options the update would ignore, and leave the caller's dict unchanged.

    ``Optimizer.load_state_dict`` casts floating-point states to the parameter's dtype, which
    would make bf16 moments fp32 (the fp32 stand-in under `lowbit.Precision`) or round fp32
    moments of small tensors to a 16-bit parameter's dtype, and a resumed run would no longer be
    the same run. A pre-hook remembers the saved states, a post-hook puts them back unchanged
    (torch's own update, fp32 states, keeps torch's placement: it reads the parameter's dtype). Saved
    moments of another state precision would otherwise be kept as they are (an ``8bit`` optimizer
    silently stepping fp32 moments) or fail deep in the first step (fp32 Adam on torchao's
    states); the pre-hook refuses them before anything is loaded. The loaded tensors are copies:
    the step updates its states in place (the step counter too), and a dict loaded twice, or kept
    to load again, must give the same states each time.
    """
    saved: dict = {}

    def pre_hook(opt, state_dict):
        check_saved_groups(opt, state_dict)
        _check_saved_options(opt, state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in opt.param_groups for p in group["params"]]
        by_id = dict(zip(ids, params, strict=True))
        for index, entry in state_dict["state"].items():
            if index in by_id:  # torch keeps a state of no parameter as it is
                _check_saved_moments(opt, by_id[index], index, entry)
        saved["state"] = state_dict["state"]
        saved["ids"] = ids

    def post_hook(opt):
        # torch's own update (fp32 states) reads its moments in the parameter's dtype: kept fp32
        # on a bf16 or fp64 parameter (saved under `lowbit.Precision` or of an fp32 model, loaded
        # into a plain loop over `model.bfloat16()`), its first step failed in ``lerp``; they are
        # placed as ``torch.optim.AdamW`` places them
        torch_update = opt.state_precision is StatePrecision.FP32
        params = [p for group in opt.param_groups for p in group["params"]]
        by_id = dict(zip(saved.pop("ids"), params, strict=True))
        for index, entry in saved.pop("state").items():
            if index not in by_id:
                continue
            param = by_id[index]
            fp32 = keeps_fp32_states(opt.state_precision, param.numel())
            for key, value in entry.items():
                if not isinstance(value, Tensor):
                    continue
                # The step counter as torch placed it; the moments as saved, on the param's device,
                # but 16-bit moments of fp32 states (a 16-bit parameter's own, saved by a run
                # without `lowbit.Precision`) as torch placed them: cast to the fp32 stand-in
                # under `Precision`, whose fp32 update fails on 16-bit moments.
                placed = (
                    key == "step"
                    or torch_update
                    or (fp32 and value.dtype in (torch.bfloat16, torch.float16))
                )
                loaded = opt.state[param][key] if placed else value.to(device=param.device)
                opt.state[param][key] = _copy(loaded) if loaded is value else loaded

    optimizer.register_load_state_dict_pre_hook(pre_hook)
    optimizer.register_load_state_dict_post_hook(post_hook)


def _check_saved_options(optimizer: Optimizer, state_dict: dict) -> None:
    """Refuse, in one line, saved param groups with an option this optimizer refuses when given
    it (``maximize``, ``amsgrad``: `_CheckedGroups.unsupported`).

    ``load_state_dict`` replaces each group's options with the saved ones, so a state saved by
    ``torch.optim.AdamW(maximize=True)`` (whose moments of small tensors are fp32, as these
    optimizers keep them too) loaded into bf16 states put ``maximize=True`` in the groups, and the
    step, which ignores it, then minimized the objective without a word."""
    for index, group in enumerate(state_dict["param_groups"]):
        for key in optimizer.unsupported:
            if group.get(key):
                raise UsageError(
                    f"the saved optimizer state has {key}=True in param group {index}, which "
                    f"{StatePrecision(optimizer.state_precision).value} optimizer states do not "
                    "support; fix: load it into an optimizer with fp32 states (--optimizer-state "
                    "fp32, torch.optim.AdamW), or start without the saved optimizer state"
                )


def _copy(t: Tensor) -> Tensor:
    """A copy of ``t`` with its own storage; torchao's quantized states (which have no
    ``clone``) through copies of their inner tensors (codes, block scales, code map); what is not
    a tensor among those parts (a DTensor's device mesh) is shared as it is."""
    if not isinstance(t, Tensor):
        return t
    if not is_traceable_wrapper_subclass(t):
        return t.clone()
    names, context = t.__tensor_flatten__()
    inner = {name: _copy(getattr(t, name)) for name in names}
    return type(t).__tensor_unflatten__(inner, context, t.size(), t.stride())


def _stored_in(moment: Tensor) -> str:
    """The precision a moment is stored in: a torchao quantized state's (``fp8``, ``8bit``,
    ``4bit``), else its dtype's (``fp32``, ``bf16``)."""
    moment = _local(moment)
    if is_traceable_wrapper_subclass(moment):
        return _torchao_states()[type(moment)].value
    return dtype_name(moment.dtype)


def _check_saved_moments(optimizer: Optimizer, param: Tensor, index: int, entry: dict) -> None:
    """Refuse, in one line, saved moments that ``optimizer`` would not store as they are (saved
    with another state precision); fp32 Adam also takes a 16-bit parameter's own dtype (what
    ``torch.optim.AdamW`` creates for it without `lowbit.Precision`).

    Saved states of another shape than their parameter (the state of another model, or of param
    groups listed in another order) are refused first: loaded, they failed only at the next step,
    on a size mismatch deep in the update, or were refused as being of another state precision
    when they were not.
    """
    for key, saved in entry.items():
        if key != "step" and isinstance(saved, Tensor) and saved.shape != param.shape:
            raise UsageError(
                f"the saved optimizer state of parameter {index} has {key} of shape "
                f"{tuple(saved.shape)}, but the parameter has shape {tuple(param.shape)}; fix: load "
                "the optimizer state saved with this model and these param groups (the same "
                "parameters in the same order), or start without the saved optimizer state"
            )
    precision = StatePrecision(optimizer.state_precision)
    expected = "fp32" if keeps_fp32_states(precision, param.numel()) else precision.value
    for key in ("exp_avg", "exp_avg_sq"):
        moment = entry.get(key)
        if not isinstance(moment, Tensor):
            continue
        stored = _stored_in(moment)
        params_own = expected == "fp32" and stored == dtype_name(param.dtype)
        if stored != expected and not params_own:
            raise UsageError(
                f"the saved optimizer state of parameter {index} ({param.numel()} values) has "
                f"{stored} moments, not the {expected} ones of {precision.value} optimizer states; "
                "fix: load it into an optimizer of the state precision it was saved with "
                "(--optimizer-state), or start without the saved optimizer state"
            )


def _check_hyperparameters(group: dict) -> None:
    """Refuse, in one line, an lr, betas, eps or weight_decay that Adam cannot use (what
    ``torch.optim.AdamW`` refuses, and NaN or inf, for every state precision alike)."""

    def number(value) -> float:  # NaN for what is not a real number (a string, a bool)
        if isinstance(value, (str, bytes, bool)):
            return math.nan
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            return math.nan

    for key in ("lr", "eps", "weight_decay"):
        if key in group and not (math.isfinite(number(group[key])) and number(group[key]) >= 0):
            raise UsageError(f"invalid {key}={group[key]!r}; fix: a finite number >= 0")
    if "betas" in group:
        betas = group["betas"]
        try:
            valid = len(betas) == 2 and all(0 <= number(b) < 1 for b in betas)
        except TypeError:
            valid = False
        if not valid:
            raise UsageError(
                f"invalid betas={betas!r}; fix: two numbers in [0, 1), e.g. (0.9, 0.999)"
            )


def _check_group(optimizer: Optimizer, group: dict, unsupported: tuple[str, ...] = ()) -> None:
    """`_check_hyperparameters` of ``group`` (with the optimizer's defaults), and refuse options
    that ``optimizer`` would otherwise ignore (``maximize``, ``amsgrad``) instead of ignoring them."""
    merged = {**optimizer.defaults, **group}
    _check_hyperparameters(merged)
    for key in unsupported:
        if merged.get(key):
            raise UsageError(
                f"{key}=True is not supported with {StatePrecision(optimizer.state_precision).value} "
                "optimizer states; fix: --optimizer-state fp32 (torch.optim.AdamW), or drop it"
            )


def _param_index(optimizer: Optimizer) -> dict[int, int]:
    return {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}


# --- fp32 ------------------------------------------------------------------------------------


class _CheckedGroups:
    """Mixin: every param group (the constructor's too) is checked by `_check_group`, refusing the
    options in ``unsupported`` that the optimizer would otherwise ignore; a copy
    (``copy.deepcopy``, pickling: ``torch.save(optimizer)``) keeps the optimizer's settings and
    its load hooks (`_keep_state_dtypes_on_load`).

    ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``: the copy of
    a bf16, fp8, 8-bit or 4-bit optimizer had lost ``is_adamw`` (and ``seed``, ``block_size``),
    and its first step failed with an AttributeError; the copy of any of them loaded states
    without the refusals and with torch's casts."""

    unsupported: tuple[str, ...] = ()
    # instance settings the step reads (torchao's, and those `build_optimizer` sets)
    _settings = ("is_adamw", "seed", "block_size", "bf16_stochastic_round", "compile")

    def add_param_group(self, param_group: dict) -> None:
        _check_group(self, param_group, self.unsupported)
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        settings = {key: self.__dict__[key] for key in self._settings if key in self.__dict__}
        return {**super().__getstate__(), **settings}

    def __setstate__(self, state: dict) -> None:
        # torch's load_state_dict calls this too, on an optimizer that has its hooks already
        copying = "_optimizer_load_state_dict_pre_hooks" not in self.__dict__
        super().__setstate__(state)
        if copying:
            _keep_state_dtypes_on_load(self)


class _RealDenseOnly(_CheckedGroups):
    """Mixin of the optimizers whose update is written here or by torchao (bf16, fp8, 8-bit,
    4-bit states), which handle neither complex parameters nor sparse gradients (nor, torchao's,
    fp64 parameters); each is refused in one line instead. Unrefused, a complex parameter took a
    wrong update without a word (its gradient's imaginary part dropped by ``.float()``, or read by
    torchao as real), an fp64 parameter was rounded to fp32 by every step, and a sparse gradient
    failed deep in ``lerp`` (bf16) or after the groups before it had already stepped.
    ``torch.optim.AdamW`` (fp32 states) handles complex and fp64 parameters itself.
    """

    refused_dtypes: tuple[torch.dtype, ...] = ()  # real dtypes the update cannot keep

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        for index, p in enumerate(group["params"]):
            if p.is_complex() or p.dtype in self.refused_dtypes:
                self.param_groups.pop()  # the group is refused whole, as torch refuses one
                raise UsageError(
                    f"parameter {_param_name(group, group_index, index)} has dtype {p.dtype}, "
                    f"which {self.state_precision.value} optimizer states cannot update; fix: "
                    "state_precision fp32 (torch.optim.AdamW), or real parameters of at most "
                    "32 bits (model.float(), torch.view_as_real)"
                )

    def _check_gradients(self) -> None:
        """Refuse a sparse gradient before any parameter is updated, so that a refused step
        leaves the parameters and states as they were."""
        for group_index, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise UsageError(
                        f"parameter {_param_name(group, group_index, index)} has a sparse "
                        f"gradient, which {self.state_precision.value} optimizer states do not "
                        "support; fix: a dense gradient (nn.Embedding(..., sparse=False)), or "
                        "torch.optim.SparseAdam for that parameter"
                    )


class AdamW(_CheckedGroups, torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``load_state_dict`` refuses, in one line, states it cannot
    continue from, and leaves the loaded dict unchanged by later steps."""

    state_precision = StatePrecision.FP32

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _keep_state_dtypes_on_load(self)


class Adam(_CheckedGroups, torch.optim.Adam):
    """``torch.optim.Adam`` whose ``load_state_dict`` refuses, in one line, states it cannot
    continue from, and leaves the loaded dict unchanged by later steps."""

    state_precision = StatePrecision.FP32

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _keep_state_dtypes_on_load(self)


# --- torchao low-bit states ------------------------------------------------------------------


def _torchao():
    import torchao.optim as ao  # imported lazily: torchao's import is slow and noisy
    from torchao.optim.adam import single_param_adam

    return ao, single_param_adam


def _torchao_states() -> dict[type, StatePrecision]:
    """torchao's quantized state tensor classes and the state precision of each; each copies by
    ``clone`` (`_clone_states`) and scales its blocks by their own largest value at any
    magnitude (`_block_scales`)."""
    from torchao.optim import subclass_4bit, subclass_8bit, subclass_fp8
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    # the quantizers each class's ``copy_`` (the state's write) looks up in its module
    subclass_8bit.scale_tensor = subclass_4bit.scale_tensor = _scale_blocks
    subclass_fp8.quantize_fp8 = _quantize_fp8

    classes = {
        OptimStateFp8: StatePrecision.FP8,
        OptimState8bit: StatePrecision.INT8,
        OptimState4bit: StatePrecision.INT4,
    }
    for cls in classes:
        if torch.ops.aten.clone.default not in getattr(cls, "_ATEN_OP_TABLE", {}).get(cls, {}):
            cls.implements(torch.ops.aten.clone.default)(_clone_states)
    return classes


def _clone_states(func, types, args, kwargs):
    """``aten.clone`` of a torchao quantized state, which torchao does not implement:
    ``copy.deepcopy`` of an optimizer or of its ``state_dict`` (a best-state snapshot kept in
    memory, an EMA's copy) clones every tensor, and failed with torchao's NotImplementedError.
    The copy holds copies of the codes, block scales and code map: the same values, bit for bit,
    in storage of its own."""
    return _copy(args[0])


_FP32_TINY = torch.finfo(torch.float32).tiny


def _block_scales(blocks: Tensor) -> Tensor:
    """Each block's largest magnitude (a row of ``blocks``), by which its values are divided before
    they are coded; an all-zero block's is fp32's smallest normal number (its codes are 0).

    torchao floors it at 1e-12 instead, so a block of smaller values was coded as a fraction of
    1e-12 and lost the resolution of its codes: a second moment ``v`` (a squared gradient) is
    below 1e-12 wherever gradients are below ~1e-6, as a large model's often are. With
    gradients of 1e-7, eps 1e-8 and 50 steps, 4-bit states moved the parameters 0.10 times as far
    as fp32 states (they stalled) and 8-bit states 1.12 times; with gradients of 1e-8, fp8 states
    1.71 times, their ``v`` rounded to 0 (the zero point, docs/memory.md). Adam's update does not
    depend on the gradients' scale (but for eps), and with this floor neither do the codes: a
    gradient scaled by a power of two gives the same codes and the same update.
    """
    return blocks.abs().amax(-1).clip(_FP32_TINY)


def _scale_blocks(input: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """torchao's ``quant_utils.scale_tensor`` (8-bit and 4-bit states) with `_block_scales`: each
    block divided by its largest magnitude, and the scales."""
    blocks = input.view(-1, block_size)
    scale = _block_scales(blocks)
    return (blocks / scale.view(-1, 1)).view(input.shape), scale


def _quantize_fp8(input: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """torchao's ``subclass_fp8.quantize_fp8`` with `_block_scales`: each block's e4m3 codes,
    its largest magnitude at e4m3's largest value, and the scales."""
    blocks = input.view(-1, block_size)
    scale = _block_scales(blocks) / torch.finfo(torch.float8_e4m3fn).max
    codes = (blocks / scale.view(-1, 1)).to(torch.float8_e4m3fn)
    return codes.view(input.shape), scale


_FP32_MAX = torch.finfo(torch.float32).max


def _storable_moments(exp_avg: Tensor, exp_avg_sq: Tensor) -> tuple[Tensor, Tensor]:
    """The bf16 states' moments to store: where ``g**2`` overflowed fp32 (``|g| > 1.8e19``: ``v``
    is inf, or beyond fp32's range when an fp64 parameter's update runs in fp64), ``v`` = fp32
    max and ``m`` = 0.

    fp32 states keep the inf, and PyTorch's update of that coordinate is 0 from then on. bf16's
    stochastic rounding saturates ``v`` to its max while ``m`` stays ~``g``, and the next update
    would be ~1e9 x lr. Stored as here, the coordinate's updates stay ~0 (``m / sqrt(fp32 max)``)
    while ``v`` decays, as PyTorch's do. NaN stays NaN.
    """
    overflow = exp_avg_sq > _FP32_MAX  # inf in fp32; NaN stays NaN
    return torch.where(overflow, 0.0, exp_avg), torch.where(overflow, _FP32_MAX, exp_avg_sq)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2), else ``t``; without importing ``torch.distributed``."""
    module = sys.modules.get("torch.distributed.tensor")
    return t.to_local() if module is not None and isinstance(t, module.DTensor) else t


def _param_name(group: dict, group_index: int, index: int) -> str:
    """A parameter's name in an error: its own where the optimizer was given named parameters
    (``model.named_parameters()``: torch keeps them as the group's ``param_names``), else its
    place in the param groups."""
    names = group.get("param_names")
    return repr(names[index]) if names else f"{index} of param group {group_index}"


class _TorchaoStates(_RealDenseOnly):
    """Mixin over a torchao ``_AdamBase`` subclass (see the module docstring)."""

    state_precision: StatePrecision
    compile: bool = False

    # torchao's step ignores maximize, and its amsgrad fails on a quantized state (torchao
    # implements no ``aten.maximum`` for them)
    unsupported = ("maximize", "amsgrad")
    # torchao's step computes in fp32 and copies the result back: an fp64 parameter would be
    # rounded to fp32 by every step, even at lr 0
    refused_dtypes = (torch.float64,)

    def add_param_group(self, param_group: dict) -> None:
        """Keep the group's learning rate as given (a float stays a float).

        torchao turns it into a 0-dim fp32 tensor (its compiled update would otherwise be
        recompiled for every new value), and ``scheduler.get_last_lr()`` then returned
        ``[tensor(0.0025)]``, which a user's logging could not ``json.dumps``. The step passes
        the update a tensor of the lr instead (`_lr_tensor`)."""
        given = param_group.get("lr", self.defaults["lr"])
        super().add_param_group(param_group)
        self.param_groups[-1]["lr"] = given

    def load_state_dict(self, state_dict) -> None:
        """A group whose lr is a float keeps a float lr: checkpoints saved before lowbit kept
        floats hold torchao's 0-dim tensor there, which ``load_state_dict`` would put back."""
        floats = [not isinstance(group["lr"], Tensor) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, was_float in zip(self.param_groups, floats, strict=True):
            if was_float and isinstance(group["lr"], Tensor):
                group["lr"] = group["lr"].item()

    def _new_buffer(self, p: Tensor, signed: bool, name: str):
        # torchao decides on the local shard (``p.to_local().numel()``); lowbit decides on the
        # global tensor (``DTensor.numel()`` is global) so that every rank agrees.
        if keeps_fp32_states(self.state_precision, p.numel()):
            return torch.zeros_like(p, dtype=torch.float32)
        from torch.distributed.tensor import DTensor

        local = p.to_local() if isinstance(p, DTensor) else p
        if local.numel() % self.block_size:
            ranks = f" over {p.device_mesh.size()} ranks" if isinstance(p, DTensor) else ""
            raise UsageError(
                f"parameter {name} {tuple(p.shape)}, sharded{ranks}: this rank's shard "
                f"{tuple(local.shape)} holds {local.numel()} values, not a multiple of the "
                f"{self.block_size}-value blocks of {self.state_precision.value} optimizer states "
                "(a block cannot straddle two ranks); fix: a rank count whose shards of it hold "
                f"whole blocks (multiples of {self.block_size} values), or state_precision fp32 "
                "or bf16 (lowbit train: --optimizer-state fp32 or bf16)"
            )
        out = self._subclass_zeros(local, signed, self.block_size)
        if isinstance(p, DTensor):  # as torchao does: shapes may differ across ranks
            out = DTensor.from_local(
                out, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        return out.to(p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        _warn_if_nothing_quantized(self)
        _, single_param_adam = _torchao()
        fn = (
            torch.compile(single_param_adam, fullgraph=True, dynamic=False)
            if self.compile
            else None
        )
        for group_index, group in enumerate(self.param_groups):
            lr = _lr_tensor(group["lr"])
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    name = _param_name(group, group_index, index)
                    state["exp_avg"] = self._new_buffer(p, True, name)
                    state["exp_avg_sq"] = self._new_buffer(p, False, name)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = self._new_buffer(p, False, name)
                state["step"] += 1
                args = (
                    p.detach(),
                    p.grad,
                    state["step"],
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state.get("max_exp_avg_sq"),
                    lr,
                    group["betas"][0],
                    group["betas"][1],
                    group["weight_decay"],
                    group["eps"],
                    self.is_adamw,
                    self.bf16_stochastic_round and p.dtype is torch.bfloat16,
                )
                if fn is None:
                    single_param_adam(*args)
                else:
                    with torch._dynamo.utils.disable_cache_limit():
                        fn(*args)
        return loss


def _warn_if_nothing_quantized(optimizer: Optimizer) -> None:
    """Warn, at the first step, where every parameter keeps fp32 states (`keeps_fp32_states`):
    the state precision then saves no memory (a small CNN's tensors are all under 4096 values),
    which the user asked for and could otherwise read only from the memory table's bytes."""
    if optimizer.state:  # not the first step (or states loaded to resume)
        return
    precision = optimizer.state_precision
    params = [p for group in optimizer.param_groups for p in group["params"] if p.numel()]
    if not any(p.grad is not None for p in params):  # no states made: not warned yet
        return
    if not all(keeps_fp32_states(precision, p.numel()) for p in params):
        return
    block = BLOCK_SIZE.get(precision)
    blocks = f", or not a multiple of the {block}-value blocks" if block else ""
    warn(
        f"{precision.value} optimizer states save no memory here: each of the {len(params)} "
        f"parameter tensors keeps fp32 states (fewer than 4096 values{blocks}), 8 bytes per "
        "parameter; fix: state_precision fp32 (lowbit train: --optimizer-state fp32) for the "
        "same memory, or a model with larger tensors"
    )


def _lr_tensor(lr) -> Tensor:
    """The learning rate as torchao's update takes it: a 0-dim fp32 tensor, a graph input of the
    compiled update (``compile=True``), so that a scheduler's new value each step is not a new
    constant to recompile for; a tensor lr (the user's own) is passed as it is."""
    return lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float32)


# torchao's optimizer class of each (state precision, AdamW or Adam)
_TORCHAO_BASES = {
    (StatePrecision.FP8, True): "AdamWFp8",
    (StatePrecision.INT8, True): "AdamW8bit",
    (StatePrecision.INT4, True): "AdamW4bit",
    (StatePrecision.FP8, False): "AdamFp8",
    (StatePrecision.INT8, False): "Adam8bit",
    (StatePrecision.INT4, False): "Adam4bit",
}
_torchao_classes: dict[tuple[StatePrecision, bool], type] = {}


def _torchao_class(precision: StatePrecision, adamw: bool) -> type:
    """lowbit's subclass of torchao's optimizer, made once (torchao is imported when one is
    needed) and reachable as this module's ``AdamW8bitLowbit`` etc. (`__getattr__`)."""
    if (precision, adamw) not in _torchao_classes:
        ao, _ = _torchao()
        _torchao_states()  # copyable before the first state exists
        base = getattr(ao, _TORCHAO_BASES[precision, adamw])
        _torchao_classes[precision, adamw] = type(
            f"{base.__name__}Lowbit", (_TorchaoStates, base), {"state_precision": precision}
        )
    return _torchao_classes[precision, adamw]


def __getattr__(name: str) -> type:
    """The fp8, 8-bit and 4-bit optimizer classes by name (``AdamW8bitLowbit``), which pickle
    looks up to save and load a whole optimizer (``torch.save(optimizer)``): made on first use,
    so that importing lowbit does not import torchao."""
    for key, base in _TORCHAO_BASES.items():
        if name == f"{base}Lowbit":
            return _torchao_class(*key)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- bf16 states with stochastic rounding ----------------------------------------------------


class AdamWBf16States(_RealDenseOnly, Optimizer):
    """Adam/AdamW with bf16 moments written back by stochastic rounding.

    The arithmetic is torchao's ``single_param_adam`` (fp32 throughout; fp64 for an fp64
    parameter)::

        p  <- p * (1 - lr * wd)                       (AdamW; Adam adds wd * p to g instead)
        m  <- lerp(m, g, 1 - beta1)                   v <- lerp(v, g*g, 1 - beta2)
        p  <- p - lr * (m / (1 - beta1**t)) / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    with ``m`` and ``v`` used in fp32 for the update and stored as ``SR_bf16(m)``, ``SR_bf16(v)``
    (``E[SR(x)] = x``). The random bits come from a generator seeded by ``(seed, step, parameter
    index)``, so a run resumed from a checkpoint draws the same bits as the uninterrupted one (the
    seed is saved with a one-process state, `load_state_dict`; torch.distributed.checkpoint keeps
    only ``state`` and ``param_groups``).
    Tensors that `keeps_fp32_states` (fewer than 4096 values) keep fp32 moments.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        is_adamw: bool = True,
        seed: int = 0,
    ):
        # every group is checked as it is added (`_CheckedGroups`)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.is_adamw = is_adamw
        self.seed = seed
        _keep_state_dtypes_on_load(self)

    state_precision = StatePrecision.BF16

    unsupported = ("maximize", "amsgrad")

    def state_dict(self) -> dict:
        """torch's optimizer state, and the ``seed`` of the stochastic rounding: resumed with
        another ``seed=``, a run drew other rounding bits than the uninterrupted one."""
        return {**super().state_dict(), "seed": self.seed}

    def load_state_dict(self, state_dict) -> None:
        """Load torch's optimizer state and continue with the saved ``seed``, as torch continues
        with the saved lr and betas; a different ``seed=`` given to the constructor is named in a
        warning. A state saved without a seed (before lowbit saved it) keeps this optimizer's."""
        saved = state_dict.get("seed") if isinstance(state_dict, dict) else None
        super().load_state_dict(state_dict)
        if saved is None:
            return
        if int(saved) != self.seed:
            warn(
                f"the loaded bf16 optimizer states were saved with seed {int(saved)}; their "
                f"stochastic rounding continues with it, not with seed {self.seed} given to this "
                "optimizer (a resumed run rounds as the uninterrupted one); to draw other bits, "
                f"set optimizer.seed = {self.seed} after loading"
            )
        self.seed = int(saved)

    def _generator(self, p: Tensor, step: int, index: int) -> torch.Generator:
        generator = torch.Generator(device=p.device)
        generator.manual_seed(((self.seed * 1_000_003 + index) * 1_000_033 + step) % (1 << 63))
        return generator

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        _warn_if_nothing_quantized(self)
        index_of = _param_index(self)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    dtype = (
                        torch.float32
                        if keeps_fp32_states(StatePrecision.BF16, p.numel())
                        else torch.bfloat16
                    )
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
                state["step"] += 1
                t = state["step"].item()
                # fp32, or the parameter's own dtype where wider: an fp64 parameter computed in
                # fp32 would be rounded to fp32 by every step, even at lr 0
                hp = torch.promote_types(p.dtype, torch.float32)
                p_hp, g_hp = p.to(hp), p.grad.to(hp)
                if self.is_adamw:
                    p_hp = p_hp - lr * wd * p_hp
                else:
                    g_hp = g_hp + wd * p_hp
                m_hp = state["exp_avg"].to(hp).lerp(g_hp, 1 - beta1)
                v_hp = state["exp_avg_sq"].to(hp).lerp(g_hp.square(), 1 - beta2)
                denom = v_hp.sqrt() / (1 - beta2**t) ** 0.5 + eps
                p.copy_(p_hp - lr * (m_hp / (1 - beta1**t)) / denom)
                m_hp, v_hp = _storable_moments(m_hp, v_hp)
                if state["exp_avg"].dtype == torch.float32:
                    state["exp_avg"].copy_(m_hp)
                    state["exp_avg_sq"].copy_(v_hp)
                else:
                    # per shard for a DTensor (FSDP2): `cast` rounds plain tensors
                    generator = self._generator(p, int(t), index_of[id(p)])
                    for key, value in (("exp_avg", m_hp), ("exp_avg_sq", v_hp)):
                        rounded = cast(_local(value), "bf16", "stochastic", generator)
                        _local(state[key]).copy_(rounded)
        return loss


# --- the entry point -------------------------------------------------------------------------


def build_optimizer(
    params,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    state_precision: str = "fp32",
    *,
    compile: bool = False,
    seed: int = 0,
) -> Optimizer:
    """An Adam (``name="adam"``) or AdamW optimizer whose moments are stored in
    ``state_precision`` (one of `STATE_PRECISIONS`); tensors under 4096 values keep fp32 states.

    ``compile`` runs torchao's update through ``torch.compile`` (worth it on a GPU; on a CPU the
    first step compiles for tens of seconds per parameter shape). ``seed`` seeds the stochastic
    rounding of bf16 states.
    """
    choose("optimizer", name, OPTIMIZERS, fix='name="adamw" (the default), or "adam"')
    precision = _state_precision(
        state_precision, fix='state_precision="fp32" (the default), or another of those'
    )
    adamw = name == "adamw"
    kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    _check_hyperparameters(kwargs)
    kwargs["betas"] = tuple(betas)
    if precision is StatePrecision.FP32:
        return (AdamW if adamw else Adam)(params, **kwargs)
    if precision is StatePrecision.BF16:
        return AdamWBf16States(params, **kwargs, is_adamw=adamw, seed=seed)
    cls = _torchao_class(precision, adamw)
    optimizer = cls(params, **kwargs, block_size=BLOCK_SIZE[precision])
    optimizer.compile = compile
    _keep_state_dtypes_on_load(optimizer)
    return optimizer
