"""The low-precision linear layer: one autograd function, three quantized GEMMs.

For ``x`` (M x K tokens by in-features) and ``w`` (N x K):

    forward      out    = x @ w.T          operands x, w        contracted over K (in-features)
    grad_input   grad_x = grad_out @ w     operands grad_out, w  contracted over N (out-features)
    grad_weight  grad_w = grad_out.T @ x   operands grad_out, x  contracted over M (tokens)

Each operand is quantized along its GEMM's contraction axis with its own `OperandSpec`, so the
weight is quantized along K in the forward and along N in the input gradient, and the activation
along K in the forward and along M in the weight gradient. With tensorwise scaling the quantized
values do not depend on the axis, so the forward's quantized weight and activation are saved and
reused (transposed) by the backward when the specs agree; otherwise the high-precision tensors are
saved and quantized again, as torchao's float8 training does. Layers that read one tensor (a
block's q, k and v projections) quantize it once between them where the result cannot differ
(`lowbit.nn.operand.SharedQuantization`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from lowbit import kernels
from lowbit.errors import UsageError
from lowbit.formats import Granularity, QTensor
from lowbit.formats.eager_roundings import keep_eager_roundings
from lowbit.formats.hadamard import random_signs, transform
from lowbit.nn.gemm import bf16_outputs, cast_gemm, emulated_gemm
from lowbit.nn.operand import (
    AmaxHistory,
    BatchAxis,
    axis_quantizer,
    quantize_operand,
    scale_agreement,
    shared_quantization,
)
from lowbit.recipes.recipe import DTYPES, GemmSpec, LayerSpec, OperandSpec, Scaling, Transform


def _transposed(q: QTensor) -> QTensor:
    return QTensor(
        values=q.values.t(),
        scale=q.scale,
        fmt=q.fmt,
        granularity=q.granularity,
        block=(q.block[1], q.block[0]),
        axis=q.axis,
        tensor_scale=q.tensor_scale,
        scale_rule=q.scale_rule,
        folded=None if q.folded is None else q.folded.t(),
    )


# A reused quantized operand travels to the backward as its tensors (saved with
# `save_for_backward`, so that activation checkpointing frees and recomputes them like any saved
# activation; kept on ``ctx`` they stayed alive through the checkpointed forward) and its layout:
# the QTensor with those fields emptied.
_TENSOR_FIELDS = ("values", "scale", "tensor_scale", "folded")


def _tensors(q: QTensor | None) -> tuple:
    if q is None:
        return (None,) * len(_TENSOR_FIELDS)
    return tuple(q.__dict__[name] for name in _TENSOR_FIELDS)  # values as stored, not recovered


def _layout(q: QTensor | None) -> QTensor | None:
    if q is None:
        return None
    return dataclasses.replace(q, **dict.fromkeys(_TENSOR_FIELDS), measured_amax=None)


# The fields of a tensorwise quantized input that hold one value per input value, which a
# convolution's layer keeps as an image (`_saved_input`); its scales are a few values.
_VALUE_FIELDS = ("values", "folded")


def _saved_input(t, x: torch.Tensor, image, unfolding):
    """What the forward saves of ``t``, a tensor shaped as its input ``x``: ``t`` itself, or for a
    convolution, whose ``x`` is read off ``image`` by ``unfolding`` (`lowbit.nn.conv._Unfolding`),
    the image (``t`` is ``x``) or ``t`` gathered into one (a cast or a tensorwise quantization of
    ``x``): the backward reads it as ``t`` again (`_input_of`), bit for bit."""
    if unfolding is None or t is None:
        return t
    return image if t is x else unfolding.image(t, image.shape)


def _input_of(saved, unfolding):
    """The tensor `_saved_input` saved ``saved`` for."""
    return saved if unfolding is None or saved is None else unfolding.rows(saved)


def _saved_operand(q: QTensor | None, x: torch.Tensor, image, unfolding) -> tuple:
    """`_tensors` of ``q``, a quantization of ``x``, saved as `_saved_input` saves them."""
    return tuple(
        _saved_input(t, x, image, unfolding) if name in _VALUE_FIELDS else t
        for name, t in zip(_TENSOR_FIELDS, _tensors(q), strict=True)
    )


def _operand_tensors(saved, unfolding) -> tuple:
    """The `_tensors` that `_saved_operand` saved as ``saved``."""
    return tuple(
        _input_of(t, unfolding) if name in _VALUE_FIELDS else t
        for name, t in zip(_TENSOR_FIELDS, saved, strict=True)
    )


def _rebuilt(layout: QTensor | None, tensors) -> QTensor | None:
    """The QTensor of `_layout` and `_tensors` (None for None)."""
    if layout is None:
        return None
    return dataclasses.replace(layout, **dict(zip(_TENSOR_FIELDS, tensors, strict=True)))


# The quantized weights the forwards keep for the backward, recorded within `kept_weight_copies`
# (None: not recording, nothing to do).
_kept_weights: list[torch.Tensor] | None = None


@contextlib.contextmanager
def kept_weight_copies():
    """A context in which the converted layers' forwards record the tensors of the quantized
    weights they save for the backward (a reused ``forward.w``: tensorwise scaling, its values and
    scale), and yields the list they are appended to. They are low-precision copies of a
    parameter that no parameter cast made: `lowbit.memory.measure_activations` finds them in this
    list to report them as temporary copies, as the estimate counts them (until session 38 it
    measured them as activations)."""
    global _kept_weights
    outer, _kept_weights = _kept_weights, []
    try:
        yield _kept_weights
    finally:
        _kept_weights = outer


def _reusable(forward: OperandSpec, backward: OperandSpec) -> bool:
    """A tensorwise operand quantizes to the same values along any axis, so a backward GEMM with
    the same spec reuses the forward's quantized tensor (transposed). With delayed scaling the
    backward then uses the forward's scale, as Transformer Engine reuses its fp8 input and weight
    (and their amax histories) in the backward GEMMs."""
    return (
        forward == backward
        and forward.granularity is Granularity.TENSOR
        and forward.rounding.value == "nearest"
    )


def reused_operands(spec: LayerSpec) -> set[str]:
    """Backward operands that reuse an earlier quantization (`_reusable`) instead of their own."""
    reused = set()
    if spec.forward.transform is Transform.NONE:
        if _reusable(spec.forward.b, spec.grad_input.b):
            reused.add("grad_input.w")
        if _reusable(spec.forward.a, spec.grad_weight.b):
            reused.add("grad_weight.x")
    if _shares_grad_out(spec):
        reused.add("grad_weight.grad_out")
    return reused


def _shares_grad_out(spec: LayerSpec) -> bool:
    """Both gradient GEMMs use one quantization of grad_out (quantized for the input gradient)."""
    return _reusable(spec.grad_input.a, spec.grad_weight.a) and (
        spec.grad_input.transform is Transform.NONE
    )


# Random Hadamard signs by (length, seed, device). `convert` gives every layer the same seed, so
# the whole model transforms with one sign vector, as Transformer Engine's NVFP4 recipe does (one
# hard-coded vector for every layer's weight-gradient transform): layers that read one input (a
# block's q, k and v projections) then quantize its transform once between them
# (`SharedQuantization`), as a fused QKV projection would.
_SIGNS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _faking_tensors() -> bool:
    """Whether a `FakeTensorMode` is active outside a Dynamo trace (`lowbit.estimate`'s fake
    model), where new tensors are fake: shapes only, no values to keep for a real run."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


class LayerState:
    """Per-layer numerics state: delayed-scaling histories and the seed of its Hadamard signs.

    ``observer`` (None: off, no cost) is called as ``observer(operand_name, x_hp, q)`` with each
    operand's high-precision tensor and its `QTensor` (`lowbit.diagnostics.stats` attaches one at
    its interval). ``dynamic_spec`` marks a spec that a controller changes during training
    (`lowbit.diagnostics.auto`): it is then saved in and restored from `state_dict`.
    """

    def __init__(self, spec: LayerSpec, seed: int = 0):
        self.seed = seed  # of the Hadamard signs, which the spec setter draws
        self.spec = spec  # also decides which quantized operands the backward reuses
        self.observer = None
        self.dynamic_spec = False
        # the operands whose spec a recipe override set (`convert`): the auto controller keeps them
        self.fixed_operands: frozenset[str] = frozenset()
        self.histories = {
            name: AmaxHistory(operand.amax_history)
            for name, operand in spec.operands().items()
            if operand.scaling is Scaling.DELAYED and name not in self.reused
        }
        # Round GEMM outputs to this dtype's values (fp16 emulation: overflow becomes inf as on
        # a GPU) while returning the autocast/input dtype so that other ops see one dtype.
        self.output_rounding: torch.dtype | None = None

    @property
    def spec(self) -> LayerSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: LayerSpec) -> None:
        # Decided once per spec, not per call (`reused_operands`): which forward quantizations
        # the backward reuses, and whether both gradient GEMMs share one quantization of grad_out.
        self._spec = spec
        self.reused = reused_operands(spec)
        self.reuse_w = "grad_input.w" in self.reused
        self.reuse_x = "grad_weight.x" in self.reused
        self.shares_grad_out = "grad_weight.grad_out" in self.reused
        # Backward GEMMs whose operands are both plain casts (int8's bf16 gradients): their
        # dtypes, for `cast_gemm` (no QTensors) where no observer needs the quantized operands.
        self.cast_gemms = {
            name: (DTYPES[gemm.a.format], DTYPES[gemm.b.format])
            for name, gemm in (("grad_input", spec.grad_input), ("grad_weight", spec.grad_weight))
            if gemm.a.is_plain_cast and gemm.b.is_plain_cast and gemm.transform is Transform.NONE
        }
        # int8's layers (integer forward operands with one current scale per row, plain-cast
        # gradient GEMMs): their `AxisQuantizer`s for the lean path (`_lean`).
        quantizers = (axis_quantizer(spec.forward.a), axis_quantizer(spec.forward.b))
        self.lean_quantizers = (
            quantizers
            if None not in quantizers
            and spec.forward.transform is Transform.NONE
            and len(self.cast_gemms) == 2
            else None
        )
        for gemm in (spec.forward, spec.grad_input, spec.grad_weight):
            if gemm.transform is Transform.HADAMARD:  # drawn now, eagerly (see `hadamard_signs`)
                self.hadamard_signs(gemm, torch.device("cpu"))

    def __setstate__(self, state: dict) -> None:
        """An unpickled state (a model saved whole) draws its Hadamard signs in this process."""
        self.__dict__.update(state)
        self.spec = self._spec

    def hadamard_signs(self, gemm: GemmSpec, device: torch.device) -> torch.Tensor:
        """The random signs of this layer's Hadamard transforms, drawn from its seed: one tensor
        for every layer with the same seed (see `_SIGNS`).

        The CPU ones are drawn when the spec is set, eagerly: a traced graph (`torch.compile`
        before the first eager step) only reads them. Drawing and caching them there broke it: a
        write to a global is a side effect Dynamo refuses in the layer's autograd function (which
        then ran eagerly), and two layers drawing them in one graph failed to compile
        (`random_signs` is an assumed constant, which one graph takes once). On another device a
        traced graph copies the CPU ones there, and caches nothing. Under a `FakeTensorMode` (an
        estimate's fake model) they are fake, drawn per call and never cached: fake signs in the
        cache crashed the backward of the next real run in the process, and real ones an estimate.
        Drawn under `torch.inference_mode()` (a model converted or unpickled there) they are
        normal tensors: an inference tensor kept failed every later backward (no version counter)."""
        key = (gemm.transform_block, self.seed, device)
        if _faking_tensors():
            return random_signs(gemm.transform_block, self.seed).to(device)
        if key not in _SIGNS:
            drawn = _SIGNS.get((gemm.transform_block, self.seed, torch.device("cpu")))
            if drawn is not None and torch.compiler.is_compiling():
                return drawn.to(device)
            with torch.inference_mode(False):  # kept: a normal tensor, as `unit_scale`'s
                _SIGNS[key] = random_signs(gemm.transform_block, self.seed).to(device)
        return _SIGNS[key]

    def reset(self) -> None:
        """Forget the amaxes recorded so far (`AmaxHistory.reset`): they were measured on weights
        that `LowbitModule.reset_parameters` has drawn again, and would scale the new ones."""
        for history in self.histories.values():
            history.reset()

    def commit(self, device: torch.device | None = None) -> None:
        """Commit every history, on ``device`` (the layer's) when given (`AmaxHistory.commit`)."""
        for history in self.histories.values():
            history.commit(device)

    def state_dict(self) -> dict:
        state = {name: h.state_dict() for name, h in self.histories.items()}
        if self.dynamic_spec:
            state["spec"] = self.spec
        return state

    def load_state_dict(self, state: dict) -> None:
        if "spec" in state:
            self.spec, self.dynamic_spec = state["spec"], True
        for name, h in self.histories.items():
            if name in state:
                h.load_state_dict(state[name])


def quantized_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    gemm: GemmSpec,
    state: LayerState,
    names: tuple[str, str],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``a @ b.T`` (fp32, rounded to ``out_dtype``) with both operands quantized along their last
    axis by ``gemm``; with its Hadamard transform, the operands' transforms are quantized (K
    zero-padded to whole transform blocks, e.g. 344 = 5.375 x 64: zeros add nothing to a @ b.T)."""
    signs = state.hadamard_signs(gemm, a.device) if gemm.transform is Transform.HADAMARD else None
    qa = _quantize(a, gemm.a, state, names[0], hadamard=signs)
    qb = _quantize(b, gemm.b, state, names[1], hadamard=signs)
    if state.observer is not None:
        if signs is not None:  # the observer compares each quantized operand with what it holds
            a, b = transform(a, signs), transform(b, signs)
        state.observer(names[0], a, qa)
        state.observer(names[1], b, qb)
    return emulated_gemm(qa, qb, out_dtype)


# Operands that several layers may take from one tensor (see `SharedQuantization`); "forward.x.cast"
# is the input cast in the forward for a weight gradient of plain casts (`_kept_input`).
_SHARED_OPERANDS = ("forward.x", "forward.x.cast", "grad_weight.x")


def _quantize(
    x: torch.Tensor,
    spec,
    state: LayerState,
    name: str,
    hadamard: torch.Tensor | None = None,
) -> QTensor:
    """Operand ``name`` of a layer quantized by ``spec`` with its delayed-scaling history (after
    the Hadamard transform of these signs, if given), shared with the layer before when that
    quantized the same input the same way (``forward.x``, ``grad_weight.x``)."""
    slot = name if name in _SHARED_OPERANDS else None
    history = state.histories.get(name)
    return quantize_operand(x, spec, history, batch_axis(name), slot, hadamard, reader=state)


def batch_axis(name: str) -> BatchAxis:
    """Where an operand holds the batch's tokens: nowhere for the weight (``*.w``); along the
    contraction axis for the weight gradient's (``grad_weight.*``, contracted over tokens); one per
    row for the others (``forward.x``, ``grad_input.grad_out``)."""
    if name.endswith(".w"):
        return BatchAxis.NONE
    return BatchAxis.COLUMNS if name.startswith("grad_weight.") else BatchAxis.ROWS


def _autocast_off(device_type: str):
    """A context with autocast off: a no-op one where it is off already (the usual backward)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def gemm_output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a converted GEMM returns for the input ``x``: autocast's where autocast is on for
    ``x``'s device, else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _kept_input(x: torch.Tensor, state: LayerState) -> torch.Tensor:
    """What the backward keeps of the input ``x`` for the weight gradient: ``x`` itself, or, where
    that GEMM casts it (int8's bf16 gradients) and no observer reads the high-precision values,
    the cast made now. The cast is then made once for the layers that read ``x`` (a block's q, k
    and v; autocast casts it for each) and the backward holds it instead of ``x`` (half the bytes
    of an fp32 input); the weight gradient's bits are the same."""
    dtypes = state.cast_gemms.get("grad_weight")
    if dtypes is None or x.dtype == dtypes[1] or state.observer is not None:
        return x
    return _quantize(x, state.spec.grad_weight.b, state, "forward.x.cast").values


def _gemms_to_run(ctx) -> tuple[bool, bool]:
    """Whether the backward will run the input-gradient GEMM and the weight-gradient GEMM: what
    autograd asks of this call (``ctx.needs_input_grad``, from the input's and the weight's
    ``requires_grad``). The forward saves only what those need: a CNN's first convolution reads
    the image, which needs no gradient, so it keeps no weight (nor its quantization) for an input
    gradient; a frozen weight (a LoRA-style fine-tune) keeps no input for a weight gradient.
    torch.func's transforms (`_ForwardRecord`) say nothing before the forward: both."""
    needs = getattr(ctx, "needs_input_grad", None)
    return (True, True) if needs is None else (bool(needs[0]), bool(needs[1]))


def _lean(x: torch.Tensor, weight: torch.Tensor, state: LayerState) -> bool:
    """Whether this call takes the lean path: a layer with `LayerState.lean_quantizers` whose
    operands the fused kernels take, with no observer and no scales to agree across ranks.

    The lean path computes what the general one does, bit for bit (tests/nn), with less Python
    around the same kernels: an `AxisQuantizer` for the input instead of `quantize`, the rest of
    the forward and the backward one C++ call each (lean_linear.cpp), no autocast context and
    nothing saved for quantized operands the backward does not reuse (BENCHMARKS.md, sessions 23
    and 24: the autograd function's own time per layer 142 -> 90 us at 4096 x 128 x 128)."""
    quantizers = state.lean_quantizers
    return (
        quantizers is not None
        and state.observer is None
        and not scale_agreement().active
        and quantizers[0].usable(x)
        and quantizers[1].usable(weight)
    )


def _lean_forward(x, weight, bias, state: LayerState, out_dtype: torch.dtype) -> torch.Tensor:
    """The forward's output: the input's rows quantized (shared with the layers that read ``x``),
    the rest in one call (`lowbit.kernels.int_rows_linear`)."""
    rows_x, rows_w = state.lean_quantizers
    shared_quantization.release("grad_weight.x")  # the last backward's inputs
    qx = shared_quantization.quantize(
        "forward.x", x, state.spec.forward.a, None, lambda: rows_x(x), reader=state
    )
    return kernels.int_rows_linear(
        qx.values,
        qx.scale,
        weight,
        bias,
        rows_w.fmt_max,
        rows_w.rule_code,
        state.output_rounding,
        out_dtype,
    )


class SecondDerivativeError(UsageError, RuntimeError):
    """A second derivative through a converted layer: a `UsageError` (one line, with the fix) that
    is also the RuntimeError PyTorch raises for what autograd cannot differentiate, so that code
    catching that still catches it."""


class _SecondDerivativeRefused(torch.autograd.Function):
    """The gradients of a converted layer computed with ``create_graph=True``, unchanged; a
    backward through them (a second derivative: a gradient penalty, MAML, a Hessian-vector
    product) is refused in one line. Quantization has no derivative, so the layer's gradients
    cannot be differentiated again. PyTorch's ``once_differentiable`` refused it with a message
    that names no fix, and let the gradients of a layer whose ``grad_out`` needs no graph (the
    last layer before ``.sum()``) drop their dependence on the weight silently. ``torch.func.grad``
    differentiates with ``create_graph=True`` and takes only functions with a ``setup_context``."""

    @staticmethod
    def forward(*grads):
        return tuple(grad.detach() for grad in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads_of_grads):
        raise SecondDerivativeError(
            "cannot differentiate twice (a backward through gradients computed with "
            "create_graph=True) through a layer that a lowbit recipe converted: its quantized "
            "GEMMs have no derivative; fix: keep the layers it passes through in high precision, "
            "recipe.with_overrides(parse_override('PATTERN=keep', recipe)) (lowbit train "
            "--override 'PATTERN=keep'), or a recipe that converts no layers (fp32, bf16-mixed)"
        )


def _first_derivative_only(backward):
    """``backward`` computed without a graph; under ``create_graph=True`` its gradients lead to
    `_SecondDerivativeRefused` (every gradient: each depends on the layer's weight or input)."""

    @functools.wraps(backward)
    def wrapper(ctx, grad_out):
        if not torch.is_grad_enabled():  # the usual backward, without create_graph: as it was
            return backward(ctx, grad_out)
        with torch.no_grad():
            grads = backward(ctx, grad_out)
        return _refusing_second_derivatives(
            grads, [grad.detach().requires_grad_() for grad in grads if grad is not None]
        )

    return wrapper


def _refusing_second_derivatives(grads: tuple, tensors: list, anchors: tuple = ()) -> tuple:
    """``grads`` (the gradients computed without a graph, None where none is due) passed through
    `_SecondDerivativeRefused`, which a backward through them reaches where ``tensors`` (``grads``
    that require a gradient) or ``anchors`` (tensors they depend on) require one."""
    refused = iter(_SecondDerivativeRefused.apply(*tensors, *anchors))
    return tuple(None if grad is None else next(refused) for grad in grads)


class LowbitLinearFunction(torch.autograd.Function):
    """The three GEMMs. ``image`` and ``unfolding`` (a convolution's, else None): ``x`` holds the
    rows ``unfolding`` reads off ``image``, and what the backward keeps of ``x`` is kept as an
    image (`_saved_input`)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, state: LayerState, out_dtype: torch.dtype, image=None, unfolding=None
    ):
        ctx.state = state
        ctx.has_bias = bias is not None
        ctx.input_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        ctx.unfolding = unfolding
        ctx.lean = _lean(x, weight, state)
        grad_input, grad_weight = _gemms_to_run(ctx)
        if ctx.lean:
            out = _lean_forward(x, weight, bias, state, out_dtype)
            ctx.save_for_backward(
                _saved_input(_kept_input(x, state), x, image, unfolding) if grad_weight else None,
                weight if grad_input else None,
            )
            _release_unfolded(unfolding)
            return out
        # Without a bias or fp16 rounding to apply in fp32, the GEMM's epilogue rounds to the
        # output dtype itself (the same bits as rounding its fp32 result, fewer passes).
        gemm_dtype = out_dtype if bias is None and state.output_rounding is None else torch.float32
        out = LowbitLinearFunction._forward(
            ctx, x, weight, state, gemm_dtype, image, unfolding, grad_input, grad_weight
        )
        if bias is not None:
            out.add_(bias)
        if state.output_rounding is not None:
            out = out.to(state.output_rounding)
        _release_unfolded(unfolding)
        return out.to(out_dtype)

    @staticmethod
    def _forward(
        ctx,
        x,
        weight,
        state: LayerState,
        gemm_dtype: torch.dtype,
        image,
        unfolding,
        grad_input: bool,
        grad_weight: bool,
    ) -> torch.Tensor:
        """The general path: the forward GEMM, and what the backward needs saved on ``ctx``: for
        each gradient GEMM that will run (``grad_input``, ``grad_weight``: `_gemms_to_run`) its
        forward operand, as is or quantized for reuse."""
        spec = state.spec
        with torch.autocast(x.device.type, enabled=False):
            forward = spec.forward
            shared_quantization.release("grad_weight.x")  # the last backward's inputs
            if forward.transform is Transform.NONE:
                qx = _quantize(x, forward.a, state, "forward.x")
                qw = _quantize(weight, forward.b, state, "forward.w")
                if state.observer is not None:
                    state.observer("forward.x", x, qx)
                    state.observer("forward.w", weight, qw)
                out = emulated_gemm(qx, qw, gemm_dtype)
            else:
                qx = qw = None
                out = quantized_gemm(
                    x, weight, forward, state, ("forward.x", "forward.w"), gemm_dtype
                )
        reuse_w, reuse_x = state.reuse_w and grad_input, state.reuse_x and grad_weight
        if state.observer is not None:  # reused tensorwise operands: the same values, same stats
            if reuse_w:
                state.observer("grad_input.w", weight, qw)
            if reuse_x:
                state.observer("grad_weight.x", x, qx)
        kept_w, kept_x = (qw if reuse_w else None), (qx if reuse_x else None)
        if _kept_weights is not None and kept_w is not None:
            _kept_weights.extend(t for t in _tensors(kept_w) if t is not None)
        ctx.quantized_layouts = (_layout(kept_w), _layout(kept_x))
        ctx.save_for_backward(
            _saved_input(_kept_input(x, state), x, image, unfolding)
            if grad_weight and not reuse_x
            else None,
            weight if grad_input and not reuse_w else None,
            *_tensors(kept_w),
            *_saved_operand(kept_x, x, image, unfolding),
        )
        return out

    @staticmethod
    @_first_derivative_only  # quantization has no derivative: a double backward is refused
    def backward(ctx, grad_out):
        state: LayerState = ctx.state
        _release_forward_inputs()  # first: not alive beside a convolution's `cols` read again
        if ctx.lean:  # nothing quantized was saved (`_lean`)
            x, weight = ctx.saved_tensors
            x = _input_of(x, ctx.unfolding)
            qw = qx = None
            if state.observer is None:
                return _lean_backward(ctx, grad_out, x, weight)
        else:
            x, weight, *quantized = ctx.saved_tensors
            x = _input_of(x, ctx.unfolding)
            layout_w, layout_x = ctx.quantized_layouts
            count = len(_TENSOR_FIELDS)
            qw = _rebuilt(layout_w, quantized[:count])
            qx = _rebuilt(layout_x, _operand_tensors(quantized[count:], ctx.unfolding))
        spec = state.spec
        grad_x = grad_w = grad_bias = None
        # A tensorwise grad_out quantizes to the same values for both gradient GEMMs: do it once
        # (where a GEMM reuses a forward operand; the others quantize their own, below).
        qg = (
            _quantize(grad_out, spec.grad_input.a, state, "grad_input.grad_out")
            if state.shares_grad_out and (qw is not None or qx is not None)
            else None
        )
        casts = state.cast_gemms if state.observer is None else {}
        with _autocast_off(grad_out.device.type):
            if ctx.needs_input_grad[0]:
                gemm = spec.grad_input
                if "grad_input" in casts and qw is None:
                    grad_x = cast_gemm(grad_out, weight.t(), casts["grad_input"], ctx.input_dtype)
                elif qw is not None:
                    qg_in = qg or _quantize(grad_out, gemm.a, state, "grad_input.grad_out")
                    if state.observer is not None:
                        state.observer("grad_input.grad_out", grad_out, qg_in)
                    grad_x = emulated_gemm(qg_in, _transposed(qw), ctx.input_dtype)
                else:
                    grad_x = quantized_gemm(
                        grad_out,
                        weight.t(),
                        gemm,
                        state,
                        ("grad_input.grad_out", "grad_input.w"),
                        ctx.input_dtype,
                    )
            if ctx.needs_input_grad[1]:
                gemm = spec.grad_weight
                if "grad_weight" in casts and qx is None:
                    grad_w = cast_gemm(grad_out.t(), x.t(), casts["grad_weight"], ctx.weight_dtype)
                elif qx is not None:
                    qg_w = (
                        _transposed(qg)
                        if qg is not None
                        else _quantize(grad_out.t(), gemm.a, state, "grad_weight.grad_out")
                    )
                    if state.observer is not None:
                        state.observer("grad_weight.grad_out", grad_out.t(), qg_w)
                    grad_w = emulated_gemm(qg_w, _transposed(qx), ctx.weight_dtype)
                else:
                    grad_w = quantized_gemm(
                        grad_out.t(),
                        x.t(),
                        gemm,
                        state,
                        ("grad_weight.grad_out", "grad_weight.x"),
                        ctx.weight_dtype,
                    )
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_out.float().sum(0).to(ctx.weight_dtype)
        return grad_x, grad_w, grad_bias, None, None, None, None


# Whether torch.func's transforms are running (a private torch function, present since 2.0; a
# torch without it runs the ordinary path, as before torch.func support)
_functorch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


class _ForwardRecord:
    """``ctx`` for `LowbitLinearFunction.forward` run by `_LinearUnderTransforms`: what the forward
    keeps for the backward (its attributes and the tensors it saves), until ``setup_context``
    hands them to the real ``ctx``."""

    def save_for_backward(self, *tensors) -> None:
        self.saved = tensors


def _dual(*tensors) -> bool:
    """Whether a tensor carries a forward-mode tangent (``torch.autograd.forward_ad``'s dual
    tensors), asked only inside a ``dual_level``. Checked before the autograd function is called,
    not by a ``jvp`` of it: Dynamo refuses to trace an autograd function that has one, which broke
    a compiled model's graph at every converted layer."""
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _forward_mode_refused() -> UsageError:
    return UsageError(
        "forward-mode derivatives (torch.func.jvp, jacfwd, torch.autograd.forward_ad) cannot pass "
        "a layer that a lowbit recipe converted: its quantized GEMMs have no derivative; fix: "
        "reverse mode (torch.func.grad, vjp, jacrev), or keep the layer in high precision with "
        "PATTERN=keep"
    )


def _vmap_refused() -> UsageError:
    return UsageError(
        "torch.func.vmap (also inside jacrev, hessian, per-sample gradients) cannot map a layer "
        "that a lowbit recipe converted: its quantization scales whole tensors, not each mapped "
        "sample; fix: call the model on the whole batch (or loop over the samples), or keep the "
        "layer in high precision with PATTERN=keep"
    )


def _plain(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` without torch.func's gradient wrappers: the values it holds, which quantization
    reads (a wrapper has no storage); a backward computes on them without a graph in any case. A
    tensor batched by ``vmap`` (jacrev maps the backward over its cotangents) is refused: its
    values hold every mapped sample."""
    while tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        if torch._C._functorch.is_batchedtensor(tensor):
            raise _vmap_refused()
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


class _PlainContext:
    """A backward's ``ctx`` whose saved tensors are `_plain`."""

    def __init__(self, ctx):
        self._ctx = ctx
        self.saved_tensors = tuple(map(_plain, ctx.saved_tensors))

    def __getattr__(self, name):
        return getattr(self._ctx, name)


class _LinearUnderTransforms(torch.autograd.Function):
    """`LowbitLinearFunction` in the form torch.func's transforms take (``torch.func.grad``,
    ``vjp``, ``jacrev`` of a ``functional_call``): a forward without ``ctx``, and a
    ``setup_context``. Its forward and backward are `LowbitLinearFunction`'s, so the gradients
    have the same bits as ordinary autograd's; the forward keeps what the backward needs (the
    quantized operands it computes, the lean path's choice) on a `_ForwardRecord`, an extra input.
    The ordinary path keeps the old form, without that object per call (`lowbit_linear` picks).
    ``vmap`` and forward-mode derivatives are refused: a quantization scales a whole tensor, not
    each vmapped sample, and has no derivative."""

    @staticmethod
    def forward(x, weight, bias, state: LayerState, out_dtype: torch.dtype, record):
        return LowbitLinearFunction.forward(record, x, weight, bias, state, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # called at each level of the transforms, the one below them included: the record stays
        record = inputs[-1]
        for name, value in vars(record).items():
            if name != "saved":
                setattr(ctx, name, value)
        ctx.save_for_backward(*record.saved)
        ctx.layer_inputs = inputs[:2]  # x and weight at this level (`backward`)

    @staticmethod
    def backward(ctx, grad_out):
        # on the plain tensors, with torch.func's transforms off (under them an op's result is a
        # wrapper, whose values quantization cannot read)
        with torch.no_grad(), torch._C._DisableFuncTorch():
            backward = LowbitLinearFunction.backward.__wrapped__
            grads = backward(_PlainContext(ctx), _plain(grad_out))[:5]  # no image, no unfolding
        if torch.is_grad_enabled():
            # torch.func.grad differentiates with create_graph=True, and refuses requires_grad_:
            # a second derivative (an outer transform, or autograd through the gradients it
            # returns) reaches the refusal through what the gradients depend on, at whichever
            # level that requires a gradient
            tensors = [grad for grad in grads if grad is not None]
            grads = _refusing_second_derivatives(grads, tensors, (*ctx.layer_inputs, grad_out))
        return (*grads, None)

    @staticmethod
    def vmap(info, in_dims, *args):
        raise _vmap_refused()

    @staticmethod
    def jvp(ctx, *tangents):
        raise _forward_mode_refused()


def _release_forward_inputs() -> None:
    """The forward is over (a backward started): let the shared quantizations of its inputs go."""
    for slot in ("forward.x", "forward.x.cast"):
        shared_quantization.release(slot)


def _release_unfolded(unfolding) -> None:
    """After a convolution's forward (``unfolding`` not None): let the shared quantizations of its
    input go. Its input is the ``cols`` it unfolded for this call, which no other layer reads, so
    the slots would only hold ``cols`` (kh*kw times the image) and its quantization alive until
    the backward starts, what the layer keeps the image to avoid (`_saved_input`)."""
    if unfolding is not None:
        _release_forward_inputs()


def _lean_backward(ctx, grad_out, x, weight) -> tuple:
    """The lean path's backward (no observer): both gradient GEMMs and the bias gradient in one
    call (`lowbit.kernels.cast_linear_backward`), as the general backward computes them."""
    state: LayerState = ctx.state
    needs = ctx.needs_input_grad
    if x is None or weight is None:  # not saved for a GEMM that does not run: never read
        unsaved = grad_out.new_empty(0)
        x, weight = (unsaved if x is None else x), (unsaved if weight is None else weight)
    grads = kernels.cast_linear_backward(
        grad_out,
        x,
        weight,
        (needs[0], needs[1], ctx.has_bias and needs[2]),
        state.cast_gemms["grad_input"],
        state.cast_gemms["grad_weight"],
        ctx.input_dtype,
        ctx.weight_dtype,
        bf16_outputs(),
    )
    return (*grads, None, None, None, None)


def check_floating_input(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Refuse an input of integers (or complex numbers), as nn.Linear and nn.Conv2d do. A converted
    layer casts its input to the compute dtype and its output back to the input's dtype, so an
    integer input would otherwise come out as the output truncated to integers, silently."""
    if not x.is_floating_point():
        raise RuntimeError(
            f"a layer that a lowbit recipe converted takes floating-point inputs, as nn.Linear and "
            f"nn.Conv2d do, and got a {x.dtype} input; fix: pass it as floats, x.to({weight.dtype})"
        )


def full_precision(op, x: torch.Tensor, weight, bias, **options) -> torch.Tensor:
    """``op`` (``F.linear``, ``F.conv2d``) computed in fp32, as a spec with every operand fp32
    says, also under autocast (which would run it in 16 bits). Under autocast the result stays
    fp32, as autocast's own fp32 ops return it; otherwise it is handed on in the input's dtype, so
    a 16-bit model around the layer sees the dtype it expects. fp32 is a floor, not a rounding: a
    float64 layer computes in float64, as it would unconverted."""
    check_floating_input(x, weight)
    if on_meta(x, weight, bias):
        return _meta_forward(op, x, weight, bias, **options)
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    with _autocast_off(device):
        bias = None if bias is None else bias.to(dtype)
        out = op(x.to(dtype), weight.to(dtype), bias, **options)
    return out if autocast else out.to(x.dtype)


class MetaDeviceError(UsageError, RuntimeError):
    """A converted layer's input and weight of which one is on the meta device: a `UsageError`
    (one line, with the fix) that is also the RuntimeError nn.Linear raises for it."""


def on_meta(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Whether a forward gets a tensor on the meta device, which `_meta_forward` answers."""
    return x.is_meta or weight.is_meta or (bias is not None and bias.is_meta)


def _meta_forward(op, x: torch.Tensor, weight, bias, **options) -> torch.Tensor:
    """A forward on the meta device, whose tensors have shapes but no values (shape inference:
    FLOP counters, memory estimators and accelerate-style tools run a model built there): the
    unconverted ``op``'s meta output, in the dtype the layer returns (the input's: autocast has no
    meta device), with nothing to quantize; a backward gives meta gradients. Weights on meta with
    an input elsewhere (or the reverse) are refused: the int8 kernels read the weight's missing
    values and returned garbage."""
    if not (x.is_meta and weight.is_meta and (bias is None or bias.is_meta)):
        raise MetaDeviceError(
            f"a layer that a lowbit recipe converted got an input on {x.device} and its weight on "
            f"{weight.device}, and the meta device holds no values; fix: model.to_empty(device="
            f"...) and then initialise (reset_parameters) or load the weights before a forward "
            f"on real inputs (a forward on meta needs the input on meta too)"
        )
    dtype = x.dtype
    return op(x, weight.to(dtype), None if bias is None else bias.to(dtype), **options)


def lowbit_linear(
    x: torch.Tensor,
    weight,
    bias,
    state: LayerState,
    out_dtype: torch.dtype | None = None,
    image: torch.Tensor | None = None,
    unfolding=None,
) -> torch.Tensor:
    """``F.linear`` with the three GEMMs quantized by ``state.spec``; any leading dims. The result
    in ``out_dtype``, `gemm_output_dtype` by default (`LowbitConvTranspose2d` asks fp32 of a
    bf16 input, for its fold to sum, where an fp32 copy of the input would be saved for the
    backward). ``image`` and ``unfolding``: a convolution's ``x`` (N x L x C*kh*kw) holds the rows
    ``unfolding`` reads off ``image``, which the backward keeps instead (`LowbitLinearFunction`;
    under torch.func's transforms the rows themselves)."""
    check_floating_input(x, weight)
    keep_eager_roundings()
    if on_meta(x, weight, bias):
        return _meta_forward(F.linear, x, weight, bias)
    dtype = out_dtype or gemm_output_dtype(x)
    if x.numel() == 0 or weight.numel() == 0:
        # an empty batch, or a layer without in- or out-features: no values to scale (nor scales
        # of no values to lay out); F.linear's result, empty or the bias
        with _autocast_off(x.device.type):
            return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if _dual(x, weight, bias):
        raise _forward_mode_refused()
    x2d = x.reshape(-1, x.shape[-1])
    if _functorch_transforms_active():  # under torch.func.grad, vjp, vmap
        record = _ForwardRecord()
        out = _LinearUnderTransforms.apply(x2d, weight, bias, state, dtype, record)
    else:
        out = LowbitLinearFunction.apply(x2d, weight, bias, state, dtype, image, unfolding)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class LowbitModule(torch.nn.Module):
    """A converted GEMM layer: the original layer's Parameters plus its numerics state.

    Each converted layer is also an instance of the class it replaced (`LowbitLinear` an
    ``nn.Linear``, `LowbitConv2d` an ``nn.Conv2d``, `LowbitConv1D` transformers' ``Conv1D``),
    without that class's constructor: its Parameters are the replaced layer's. Initialisation by
    ``isinstance`` then reaches it: transformers' ``_init_weights`` (``init_weights()``,
    ``initialize_weights()``, ``apply(model._init_weights)``) draws normal(0, initializer_range)
    for those classes, and skipped the converted layers, which kept the uninitialised memory of
    ``to_empty`` after a model built on the meta device (and every later draw came from
    different random numbers)."""

    def __init__(self, layer: torch.nn.Module, spec: LayerSpec, seed: int = 0):
        torch.nn.Module.__init__(self)  # not the replaced class's: it would make new Parameters
        # The replaced layer's own flags, which initialisation code reads with the isinstance:
        # transformers' ``_is_hf_initialized`` (set, the layer is not drawn again; without it
        # ``init_weights()`` redrew a converted layer of a model initialised before), nanoGPT's
        # ``NANOGPT_SCALE_INIT``. Only plain values: an accelerate hook's ``forward`` would
        # replace the layer's own.
        for name, value in vars(layer).items():
            if isinstance(value, (bool, int, float, str)) and name not in vars(self):
                setattr(self, name, value)
        self.weight = layer.weight
        self.bias = layer.bias
        self.lowbit_state = LayerState(spec, seed)
        self.train(layer.training)

    def train(self, mode: bool = True):
        """Also: delayed-scaling histories record amaxes in training mode only (`AmaxHistory`)."""
        for history in self.lowbit_state.histories.values():
            history.recording = mode
        return super().train(mode)

    @property
    def spec(self) -> LayerSpec:
        return self.lowbit_state.spec

    def reset_parameters(self) -> None:
        """Draw the Parameters as the layer this one replaced initialises them, from the same
        random numbers (`_init_parameters`), and forget the amaxes recorded on the old ones.
        Deferred initialisation calls it on every module that has it: a model built on the meta
        device, converted, then ``to_empty`` (FSDP2's and torchtitan's flow) holds uninitialised
        memory, which the converted layers kept, without it, and trained on to NaN.

        16-bit Parameters (fp16-low's) are drawn in fp32 and rounded, as in a model built in fp32
        and then converted: a draw in 16 bits consumes the same random numbers but is not their
        rounding (``uniform_`` in bf16 or fp16 turns the values that round up to its upper bound
        into its lower bound, 0.1-0.2% of nn.Linear's weights with their sign flipped)."""
        halves = {
            name: p
            for name, p in self._parameters.items()
            if p is not None and p.dtype in (torch.float16, torch.bfloat16)
        }
        with torch.no_grad():
            for name, p in halves.items():  # swapped for fp32 tensors during the draw
                self._parameters[name] = torch.empty_like(p, dtype=torch.float32)
            try:
                self._init_parameters()
            finally:
                for name, p in halves.items():
                    p.copy_(self._parameters[name])
                    self._parameters[name] = p
        self.lowbit_state.reset()

    def _init_parameters(self) -> None:
        """The replaced layer's initialisation of the Parameters; none for a layer without its
        own (an expert's GEMM reads a slice of its experts module's)."""

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` asks of every module before it compiles: a refusal in one
        line. TorchScript cannot compile the layer's Python (its `LayerState`, the quantization's
        dataclasses), and failed with an error about the source of ``LayerSpec.__init__``."""
        raise UsageError(self._refused_by_jit("torch.jit.script cannot compile"))

    def _slow_forward(self, *args, **kwargs):
        """The forward nn.Module calls while ``torch.jit.trace`` records, and only then: refused in
        one line where the layer quantizes, since the tracer cannot record its autograd function
        with the layer's state as an argument (it failed with ``unordered_map::at``). A layer of
        fp32 operands computes ``F.linear`` / ``F.conv2d``, which the tracer records."""
        if not self.spec.is_identity:
            raise UsageError(self._refused_by_jit("torch.jit.trace cannot record"))
        return super()._slow_forward(*args, **kwargs)

    def _refused_by_jit(self, what: str) -> str:
        return (
            f"{what} a {type(self).__name__}, a layer that a lowbit recipe converted "
            f"({self.spec.describe()}); fix: torch.compile(model) compiles it, or script or trace "
            f"the model before lowbit.convert"
        )


class LowbitLinear(LowbitModule, torch.nn.Linear):
    """Drop-in `nn.Linear` whose GEMMs follow a `LayerSpec`; shares the original Parameters."""

    def __init__(self, linear: torch.nn.Linear, spec: LayerSpec, seed: int = 0):
        super().__init__(linear, spec, seed)
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def _init_parameters(self) -> None:
        torch.nn.Linear.reset_parameters(self)  # reads only weight and bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.is_identity:
            return full_precision(F.linear, x, self.weight, self.bias)
        return lowbit_linear(x, self.weight, self.bias, self.lowbit_state)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.spec.describe()}"
        )


class LowbitConv1D(LowbitModule):
    """Drop-in for transformers' ``Conv1D`` (GPT-2's projections): a linear layer whose weight is
    stored transposed, ``nx x nf`` (in x out), so ``y = x @ W + b``. The same Parameter is kept
    (checkpoints keep their keys and shapes); the GEMMs read its transpose ``W.T`` (out x in), a
    view, so each operand is quantized along the same axis as an ``nn.Linear``'s.

    lowbit does not import transformers, so the layer made is of a subclass that is also a
    ``Conv1D`` (`_TransformersLowbitConv1D`), made when a Conv1D is converted."""

    def __new__(cls, *args, **kwargs):
        if cls is LowbitConv1D:
            cls = _transformers_conv1d_layer()
        return super().__new__(cls)

    def __init__(self, conv1d: torch.nn.Module, spec: LayerSpec, seed: int = 0):
        super().__init__(conv1d, spec, seed)
        self.nf, self.nx = conv1d.nf, conv1d.nx

    def _init_parameters(self) -> None:
        """What transformers' ``Conv1D`` constructor draws (it has no ``reset_parameters``; its
        models' ``_init_weights`` draws with the config's ``initializer_range``)."""
        torch.nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.is_identity:
            return full_precision(F.linear, x, self.weight.t(), self.bias)
        return lowbit_linear(x, self.weight.t(), self.bias, self.lowbit_state)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self.spec.describe()}"

    __repr__ = torch.nn.Module.__repr__  # not Conv1D's, which leaves out the spec


@functools.cache
def _transformers_conv1d_layer() -> type:
    """`LowbitConv1D` as a subclass of transformers' ``Conv1D`` too (`LowbitModule`)."""
    from transformers.pytorch_utils import Conv1D

    namespace = {"__module__": __name__, "__qualname__": "_TransformersLowbitConv1D"}
    return type(
        "LowbitConv1D", (LowbitConv1D, Conv1D), namespace | {"__doc__": LowbitConv1D.__doc__}
    )


def __getattr__(name: str):
    # pickle finds a converted Conv1D's class by its name in this module, also in a new process
    if name == "_TransformersLowbitConv1D":
        return _transformers_conv1d_layer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
