"""Quantizing one GEMM operand by its `OperandSpec`, with delayed-scaling state when asked."""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import Enum

import torch

from lowbit.dynamo_marks import cache
from lowbit.formats import Granularity, QTensor, quantize, tensor_amax, unit_scale
from lowbit.formats.cast import Rounding
from lowbit.formats.hadamard import transform
from lowbit.formats.qtensor import AxisQuantizer
from lowbit.formats.spec import IntFormat, get
from lowbit.recipes.recipe import DTYPES, OperandSpec, Scaling


class BatchAxis(str, Enum):
    """Where a 2-D GEMM operand (quantized along its last axis) holds the batch's tokens, which
    data-parallel ranks split between them."""

    NONE = "none"  # a weight: the same on every rank
    ROWS = "rows"  # one token per row (forward.x, grad_input.grad_out): quantized along features
    COLUMNS = "columns"  # quantized along the tokens (grad_weight.*): every row spans the batch


class ScaleAgreement:
    """How the ranks of a data-parallel job agree on scales; this base object is the one-process
    no-op. `lowbit.distributed` installs one that all-reduces (`set_scale_agreement`).

    A scale is ``amax / format_max`` over the values it covers; when those values are split over
    ranks (a batch-dependent operand: activation, gradient), each rank would quantize with its own
    scale. Taking the max over ranks gives every rank the scale a single process would compute on
    the global batch. Which amaxes that takes (`agreed_amax`):

    - a tensorwise scale, and NVFP4's per-tensor scale (its 16-blocks are one rank's): the tensor
      amax, for every batch-dependent operand;
    - per-row scales (granularity ``axis``) of an operand quantized along the tokens (the weight
      gradient's operands, ``BatchAxis.COLUMNS``): each row's amax; rows that are tokens
      (``BatchAxis.ROWS``) lie on one rank and need nothing;
    - block scales (MX, 1x128 tiles) need nothing: each block lies within one rank's tokens.
    """

    active = False  # True: quantize_operand reduces the amaxes of batch-dependent operands

    def amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The elementwise max of ``amax`` over ranks (fp32, same shape)."""
        return amax

    def all_finite(self, finite: bool) -> bool:
        """True when every rank's gradients are finite (one joint loss-scaler decision)."""
        return finite


_agreement = ScaleAgreement()


def scale_agreement() -> ScaleAgreement:
    return _agreement


def set_scale_agreement(agreement: ScaleAgreement | None) -> ScaleAgreement:
    """Install ``agreement`` (None: the one-process no-op); returns the previous one."""
    global _agreement
    previous, _agreement = _agreement, agreement or ScaleAgreement()
    return previous


class AmaxHistory:
    """Delayed scaling (Transformer Engine): quantize with the max amax of earlier steps.

    The scale of step t comes from ``max(history)`` over the last ``length`` steps; the amax
    measured in step t is held as pending and enters the history when `commit` is called (by
    ``Precision.step``), so every micro-batch of a step uses the same scale. Before the first
    commit the current amax is used (current scaling). Values above the delayed amax saturate.
    ``recording`` is off while the layer is in eval mode: evaluation batches use the history's
    scale but do not enter it (they would otherwise ride into the next training step's commit,
    and a run resumed from the checkpoint written after an evaluation would differ).
    The history lives on the device of the amaxes it records (moved there on first use, e.g. after
    loading a checkpoint onto the CPU), so that a GPU layer's scale never waits for a copy.

    Under `torch.compile` the amaxes go into ``traced_pending`` instead, in place: a layer's
    autograd function is traced whole, and Dynamo breaks the graph at an attribute assignment
    inside it (``pending = ...``), not at a write into a tensor. `commit` takes both; eager runs
    leave ``traced_pending`` at -inf (nothing recorded), so their ``pending`` is as it was.
    """

    def __init__(self, length: int):
        self.recording = True
        self.reset(length)

    def reset(self, length: int | None = None) -> None:
        """The state of a new history of ``length`` steps (the current length when not given):
        no amax recorded, the recording mode as it is. Made on the CPU whatever the default
        device: a layer converted under ``with torch.device("meta")`` got a history with no
        values, which ``model.to_empty`` does not reach (it is not a buffer) and which failed at
        the first commit; the history moves to the amaxes' device on first use."""
        length = len(self.history) if length is None else length
        self.history = torch.zeros(length, dtype=torch.float32, device="cpu")
        self.filled = 0
        # Whether the scale comes from the history (after the first commit), so that the current
        # amax is needed only for the history. A bool of its own, not `filled > 0`: a compiled
        # graph guards on the values it reads, and reading the count recompiled it at every
        # commit until the history was full (past Dynamo's recompile limit: eager from then on).
        self.delayed = False
        self.pending: torch.Tensor | None = None
        self.traced_pending = torch.tensor(float("-inf"), device="cpu")

    def record(self, current: torch.Tensor) -> None:
        """Hold this step's amax for the next `commit` (in training mode)."""
        if not self.recording:
            return
        if torch.compiler.is_compiling():
            held = self.traced_pending
            held.copy_(torch.maximum(held.to(current.device), current.detach()))
        else:
            self.pending = current if self.pending is None else torch.maximum(self.pending, current)

    def delayed_amax(self, device: torch.device) -> torch.Tensor:
        """max(history), on ``device`` (the operand's)."""
        self._move_to(device)
        return self.history.max()

    def scaling_amax(self, current: torch.Tensor) -> torch.Tensor:
        """Record ``current``; the amax to scale with (``current`` itself before the first commit)."""
        self.record(current)
        return self.delayed_amax(current.device) if self.delayed else current

    def _move_to(self, device: torch.device) -> None:
        if self.history.device != device:
            # normal tensors even when first moved under `torch.inference_mode()` (a history
            # loaded on the CPU, its GPU model evaluated first): `commit` writes into them
            with torch.inference_mode(False):
                self.history = self.history.to(device)
                self.traced_pending = self.traced_pending.to(device)

    def commit(self, device: torch.device | None = None) -> None:
        """Roll the history and append this step's amax (called once per optimizer step).

        ``device`` (the layer's) moves the history there first, eagerly: a GPU model compiled
        before its first eager step recorded into the CPU tensors the history starts as, and
        moving them inside the next compiled step assigned attributes there (a graph break)."""
        if device is not None:
            self._move_to(device)
        # -inf (nothing recorded) unless a compiled graph recorded: neutral under the maximum, and
        # not finite, as a step with no amax at all (merged without a bool, which would sync a GPU)
        traced = self.traced_pending
        pending = traced.clone() if self.pending is None else torch.maximum(self.pending, traced)
        traced.fill_(float("-inf"))
        self.pending = pending
        if not torch.isfinite(self.pending):
            self.pending = None  # an overflowing step does not poison the history
            return
        self._move_to(self.pending.device)
        self.history = torch.roll(self.history, 1)
        self.history[0] = self.pending.detach().float()
        self.filled = min(self.filled + 1, len(self.history))
        self.delayed = True
        self.pending = None

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].clone().float()
        self.filled = int(state["filled"])
        self.delayed = self.filled > 0
        self.pending = None
        self.traced_pending.fill_(float("-inf"))


def plain_cast(x: torch.Tensor, spec: OperandSpec) -> QTensor:
    """An fp32/bf16/fp16 operand: a dtype conversion (IEEE: overflow gives inf, as on a GPU)."""
    values = x.to(DTYPES[spec.format])
    rows = values.reshape(-1, values.shape[-1]).shape[0] if values.dim() else 1
    return QTensor(
        values=values,
        scale=unit_scale(x.device),
        fmt=get(spec.format),
        granularity=Granularity.TENSOR,
        block=(max(rows, 1), max(values.shape[-1], 1)),
        axis=-1 % max(values.dim(), 1),
    )


def agreed_amax(granularity: Granularity, batch: BatchAxis) -> str | None:
    """Which amax of ``x`` the ranks must agree on: "tensor", "row" or None (see `ScaleAgreement`)."""
    if batch is BatchAxis.NONE:
        return None
    if granularity in (Granularity.TENSOR, Granularity.NVFP4):
        return "tensor"
    if granularity is Granularity.AXIS and batch is BatchAxis.COLUMNS:
        return "row"
    return None


def quantize_operand(
    x: torch.Tensor,
    spec: OperandSpec,
    history: AmaxHistory | None = None,
    batch: BatchAxis = BatchAxis.NONE,
    shared_slot: str | None = None,
    hadamard: torch.Tensor | None = None,
    reader: object | None = None,
) -> QTensor:
    """Quantize a 2-D operand along its last axis (the GEMM's contraction axis).

    ``batch``: where the operand holds the batch's tokens (an activation or gradient; NONE for a
    weight); the ranks of a data-parallel job agree on the amaxes that span them (`ScaleAgreement`).
    ``shared_slot``: reuse the last result of this slot when it came from the same ``x``, ``spec``
    and scaling amax and ``reader`` (the asking layer) has not had it yet (`SharedQuantization`).
    ``hadamard``: random signs; the operand's Hadamard transform is quantized instead (the last axis
    zero-padded to whole blocks), computed inside the quantization unless an amax must be measured
    on the transformed values first (delayed scaling, amaxes agreed across ranks, plain casts).
    """
    if hadamard is not None and (spec.is_plain_cast or history is not None or _agreement.active):
        x, hadamard = transform(x, hadamard), None
    if spec.is_plain_cast:
        return shared_quantization.quantize(
            shared_slot, x, spec, None, lambda: plain_cast(x, spec), reader=reader
        )
    rows = axis_quantizer(spec)
    if rows is not None and hadamard is None and not _agreement.active and rows.usable(x):
        # the same QTensor as below (no amax to take or agree on), without `quantize`'s checks
        return shared_quantization.quantize(
            shared_slot, x, spec, None, lambda: rows(x), reader=reader
        )
    amax = None
    measure = False  # take this step's amax for the history while quantizing (delayed scaling)
    agree = agreed_amax(spec.granularity, BatchAxis(batch)) if _agreement.active else None
    if spec.scaling is Scaling.DELAYED and history is not None:
        if history.delayed and not agree:  # delayed specs are tensorwise (OperandSpec checks)
            amax, measure = history.delayed_amax(x.device), history.recording
        else:
            current = shared_quantization.amax(shared_slot, x, lambda: tensor_amax(x))
            amax = history.scaling_amax(_agreement.amax(current) if agree else current)
    elif agree == "tensor":
        amax = _agreement.amax(tensor_amax(x))
    elif agree == "row":
        amax = _agreement.amax(x.detach().abs().amax(dim=-1).float())

    def compute() -> QTensor:
        return quantize(
            x,
            spec.format,
            spec.granularity,
            axis=-1,
            block_size=spec.block_size,
            scale_rule=spec.scale_rule,
            rounding=spec.rounding,
            amax=amax,
            fold=True,
            hadamard=hadamard,
            keep_values=False,  # a GEMM reads the folded operand only
            measure_amax=measure,
        )

    q = shared_quantization.quantize(shared_slot, x, spec, amax, compute, hadamard, reader)
    if measure:  # measured by the quantization (or now, if shared by a reader that did not ask)
        history.record(tensor_amax(x) if q.measured_amax is None else q.measured_amax)
    return q


# Not `functools.cache`: Dynamo warned at every compile that it ignores an lru_cache wrapper, and
# a dict read in the trace recompiled a model compiled before its first eager step at that step.
@cache
def axis_quantizer(spec: OperandSpec) -> AxisQuantizer | None:
    """The `AxisQuantizer` of an integer operand with one current scale per row and nearest
    rounding (int8's forward operands), None for every other spec; made once per spec."""
    if (
        spec.granularity is not Granularity.AXIS
        or spec.scaling is not Scaling.CURRENT
        or spec.rounding is not Rounding.NEAREST
        or spec.block_size is not None
        or not isinstance(get(spec.format), IntFormat)
    ):
        return None
    return AxisQuantizer(spec.format, spec.scale_rule)


class SharedQuantization(threading.local):
    """The last quantization of each named operand slot, handed to the next layer that quantizes
    the same input the same way.

    Several layers often take one tensor: a transformer block's q, k and v projections all read
    the normed hidden states, and its gate and up projections the same second ones; in the
    backward their weight gradients read those tensors again (``x.T``). Quantizing a tensor with
    one spec and one scaling amax (current scaling, or a delayed amax that the layers' histories
    agree on, as they do when they have seen the same inputs) gives the same values every time,
    so the second and third layers reuse the first one's (a fused QKV projection quantizes its
    input once too); delayed scaling's measurement of the current amax is shared the same way.
    So is a stochastically rounded quantization (and one after a Hadamard transform with the same
    signs): the layers then see one draw of the rounding, as the three parts of a fused QKV
    projection do, and each layer's GEMM stays unbiased. A result goes to each reader (layer)
    once: a layer that asks again (called twice on one input, a second backward through the same
    graph) quantizes afresh, so its repeated stochastic roundings are independent draws. Amaxes
    agreed across ranks are not shared.

    An entry holds its inputs (and signs), so that the memory under its key cannot be reused by
    another tensor while the entry lives; `release` drops a slot when its pass is over (the
    forward slot when the backward starts, the weight-gradient slot when the next forward starts).
    """

    def __init__(self):
        self.slots: dict[str, tuple[tuple, object, object, set[int]]] = {}

    def quantize(
        self,
        slot: str | None,
        x: torch.Tensor,
        spec: OperandSpec,
        amax: torch.Tensor | None,
        compute: Callable[[], QTensor],
        hadamard: torch.Tensor | None = None,
        reader: object | None = None,
    ) -> QTensor:
        """``compute()``, or what it returned last time in ``slot`` for the same ``x``, ``spec``,
        ``amax`` and Hadamard signs, unless ``reader`` had that result already."""
        if slot is None or not _shareable(x, amax):
            return compute()
        scaling = None if amax is None else amax.item()
        signs = None if hadamard is None else _identity(hadamard)
        key = (*_identity(x), spec, scaling, signs)
        return self._reuse(slot, key, (x, hadamard), compute, reader)

    def amax(
        self, slot: str | None, x: torch.Tensor, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """``compute()`` (the measured amax of ``x``), or its last result for the same ``x``."""
        if slot is None or not _shareable(x, None):
            return compute()
        return self._reuse(f"{slot}.amax", _identity(x), x, compute)

    def _reuse(self, slot: str, key: tuple, inputs, compute: Callable, reader=None):
        """The slot's result for ``key`` (computed now if it holds another key, or if ``reader``
        had it already); readers are told apart by identity, None is no one in particular."""
        last = self.slots.get(slot)
        if last is not None and last[0] == key and id(reader) not in last[3]:
            if reader is not None:
                last[3].add(id(reader))
            return last[2]
        result = compute()
        self.slots[slot] = (key, inputs, result, set() if reader is None else {id(reader)})
        return result

    def release(self, slot: str) -> None:
        if torch.compiler.is_compiling():  # a traced call neither reads nor writes the slots
            return
        for name in (slot, f"{slot}.amax"):
            self.slots.pop(name, None)


def _identity(x: torch.Tensor) -> tuple:
    """What tells one tensor's current values from another's while the tensor is alive."""
    return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version)


def _shareable(x: torch.Tensor, amax: torch.Tensor | None) -> bool:
    return (
        # first: traced tensors have no memory to key on, and Dynamo cannot trace `is_inference`
        # (a graph break there dropped the layer's whole autograd function out of the graph)
        not torch.compiler.is_compiling()
        and (amax is None or (amax.device.type == "cpu" and amax.numel() == 1))  # no GPU sync
        and not _agreement.active
        and not x.is_inference()  # no version counter to tell an in-place change
    )


shared_quantization = SharedQuantization()
