"""Per-layer, per-GEMM-operand numerics statistics, collected at an interval during training.

For one operand ``x`` (high precision) quantized to ``q`` (values ``v`` with per-element scale ``s``,
dequantized ``d = v * s``) of a format with largest finite value ``max``. ``s`` is the scale the
layer's cast used (current or delayed, per tensor, row or block), so ``saturated`` and
``underflow`` are what that cast clipped and flushed: a value flushes where ``|x| / s`` falls below
half the format's smallest subnormal (a tie rounds to zero), not ``|x|`` itself (e4m3 tensorwise
with ``amax = A`` flushes at or below ``A / 448 * 2**-10``; a stale delayed amax ``A' < A`` lowers
that to ``A' / 448 * 2**-10``, flushing less, and clips what lies beyond ``464 / 448 * A'``,
past what rounds to ``A'``):

- ``amax``       ``max |x|`` over the finite elements
- ``rms``        ``sqrt(mean(x^2))``; ``amax / rms`` is the crest factor, large for outliers;
                 non-finite exactly when ``x`` holds inf or NaN (squares summed in float64)
- ``saturated``  fraction of elements clipped at the format's max beyond rounding: ``|x| / s``
                 past the midpoint half a step of the top binade above ``max``, or at it where
                 round-to-nearest-even takes it up (`clip_threshold`: above 464 in e4m3, from
                 65520 in fp16), where an IEEE dtype without scale overflows to inf; a value
                 closer to ``max`` rounds to it as it would with no limit on the range. A zero
                 scale (an NVFP4 block scale rounded to zero) flushes its values: they count in
                 ``underflow``, not here
- ``underflow``  fraction of the *nonzero* elements flushed to zero: ``x != 0`` and ``d == 0``.
                 For a gradient already in the format's dtype (fp16-low's fp16 gradients) the
                 cast flushes nothing: what underflowed did so upstream, in the 16-bit
                 arithmetic that made ``x``, to zeros that cannot be told from true ones. Its
                 subnormals (``0 < |x| <`` the format's smallest normal) are what is left of the
                 values underflowing, and count as flushed. Only gradients: loss scaling exists
                 to lift them out of that range, while a 16-bit activation's subnormals are what
                 a mixed recipe's cast would make of it too (and does not count).
- ``sqnr``       ``10 log10(sum x^2 / sum (x - d)^2)`` dB, as `lowbit.formats.error.sqnr`
- ``scale``      the scale used: the tensor's scale, or the median of its block scales
- ``nonfinite``  fraction of elements non-finite in ``x`` or in ``d``
- ``noise_saturated`` / ``noise_underflow``  the shares of the error energy ``sum (x - d)^2`` that
                 saturated and flushed elements carry; what remains is rounding error. The doctor
                 names the reason of a loss from these shares.

Each operand's record also names what quantized it: ``format`` (the element format, e.g.
``fp8_e4m3``) and ``spec`` (`OperandSpec.describe`, e.g. ``fp8_e4m3/tensor`` or ``fp8_e4m3/mx``:
``auto``'s fp8 and MXFP8 rungs share the element format, not the spec).

Everything is computed as tensors and read back in one transfer per step (`StatsCollector.collect`)
so collecting costs one host sync, not one per number. Off by default: no observer is attached to
any layer (``LayerState.observer is None``) and the layer code does nothing extra.
"""

from __future__ import annotations

import functools
import math

import torch

from lowbit import kernels
from lowbit.formats import Granularity, QTensor
from lowbit.recipes.recipe import LayerSpec

STATS = (
    "amax",
    "rms",
    "saturated",
    "underflow",
    "sqnr",
    "scale",
    "nonfinite",
    "noise_saturated",
    "noise_underflow",
)
# the place of the non-finite share in the raw statistics vector (`_finish`'s order, as `STATS`')
_NONFINITE = STATS.index("nonfinite")
OPERANDS = tuple(LayerSpec().operands())  # forward.x ... grad_weight.x, in GEMM order
DEFAULT_INTERVAL = 50  # steps between statistics; measured overhead in BENCHMARKS.md


def _per_element_scale(q: QTensor) -> torch.Tensor:
    # One tensor scale broadcasts (no expanded copy). An empty operand's scale grid is empty
    # ((0, 1) for no rows), not a single value: laid out as its (empty) values instead.
    if q.granularity is Granularity.TENSOR and q.effective_scale().numel() == 1:
        return q.effective_scale().reshape(())
    return q.expanded_scale()


@functools.cache
def clip_threshold(fmt) -> float:
    """The scaled magnitude ``|x| / s`` above which a value counts as clipped (``saturated``):
    where round-to-nearest-even on the format's grid continued past its largest value ``max``
    leaves ``max``, so that the saturating cast gives another value than rounding with no limit
    on the range would. That is the midpoint half a step of the top binade above ``max`` (464 in
    e4m3, 61440 in e5m2, 65520 in fp16, 7 in MX e2m1, 127.5 in int8), the midpoint itself
    included where ``max`` is an odd multiple of the step (its tie rounds up, as an IEEE cast
    overflows to inf): every format lowbit has but e4m3, whose 448 is 14 steps of 32, so 464
    rounds to 448 (counted as clipped until session 41). A value below rounds to ``max`` with
    no limit too, so clamping it loses nothing that rounding did not. Counted from ``max`` itself
    (until session 41), fp8-delayed flagged 0.4-0.6% of the digits CNN's second convolution
    weight at each step: its amax had grown 0.3-1% past the history's, all within e4m3's rounding
    at the top. Returned for ``|x| / s > threshold``: the midpoint, or the largest fp32 below it
    where the tie counts."""
    step = 1.0 if fmt.kind == "int" else 2.0 ** (fmt.emax - fmt.mbits)
    bound = torch.tensor(float(fmt.max) + step / 2, dtype=torch.float32)
    if round(float(fmt.max) / step) % 2 == 0:  # the tie rounds down, to max: not clipped
        return bound.item()
    return torch.nextafter(bound, bound.new_zeros(())).item()


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_VALUES = (*_KERNEL_DTYPES, torch.int8)


@torch.no_grad()
def operand_stats_tensor(x_hp: torch.Tensor, q: QTensor, gradient: bool = False) -> torch.Tensor:
    """The `STATS` of one quantized operand as a float64 vector (no host sync). ``gradient``:
    the operand is an output gradient, whose subnormals count as flushed where it is already in
    its format's dtype (``underflow`` above).

    ``d = v * s`` in fp32 (exact for the carrier values and their power-of-two or fp32 scales up
    to one rounding); ``x - d`` and the squares in float64, where those of any finite fp32 value
    neither overflow nor flush to zero (in fp32, values above ~1.8e19 would read as non-finite and
    those below ~1e-23 as error-free zeros); sums accumulated in float64.
    """
    f64 = torch.float64
    scale = _per_element_scale(q).float()
    # clipped beyond what rounding to the top code would do (`clip_threshold`)
    saturation = clip_threshold(q.fmt)
    values = q.values
    # a gradient already in the format: its subnormals count as flushed (`underflow`); 0: none
    in_format = gradient and x_hp.dtype == q.fmt.torch_dtype
    subnormal_below = float(q.fmt.min_normal) if in_format else 0.0
    if kernels.usable(values) and x_hp.dtype in _KERNEL_DTYPES and values.dtype in _KERNEL_VALUES:
        # one pass, the same arithmetic as below (stats.cpp: d in fp32, squares in float64)
        x = x_hp.detach().reshape(values.shape)
        grid = q.effective_scale().flatten()
        stats = kernels.operand_stats(
            x.contiguous(), values.contiguous(), scale.contiguous(), saturation, subnormal_below
        )
        stats[5] = grid.median().double() if grid.numel() else 1.0
        return stats
    x = x_hp.detach().reshape(values.shape).float()
    d = values.float() * scale
    ax = x.abs()
    finite_x = ax < math.inf
    n = max(x.numel(), 1)
    err2 = x.double().sub_(d).square_()  # d promoted as it is read, not copied to float64
    # a zero scale (an NVFP4 block scale rounded to zero) flushes its block: nothing clips there
    saturated = finite_x & (scale > 0) & (ax > saturation * scale)
    nonzero = x != 0
    flushed = nonzero & ((d == 0) | (ax < subnormal_below))
    signal = x.double().square_().sum()
    amax = torch.where(finite_x, ax, 0).amax().double() if x.numel() else signal * 0
    nonfinite = (~finite_x | ~torch.isfinite(d)).sum()
    grid = q.effective_scale().flatten()
    scale_used = grid.median().double() if grid.numel() else signal * 0 + 1
    return torch.stack(
        [
            amax,
            (signal / n).sqrt(),
            saturated.sum().double() / n,
            flushed.sum().double() / nonzero.sum().clamp(min=1),
            signal,  # turned into sqnr on the host (the inf/-inf/nan rules of `sqnr`)
            scale_used,
            nonfinite.double() / n,
            torch.where(saturated, err2, 0).sum(dtype=f64),
            torch.where(flushed, err2, 0).sum(dtype=f64),
            err2.sum(dtype=f64),
        ]
    )


def _finish(raw: list[float]) -> dict[str, float]:
    amax, rms, sat, under, signal, scale, nonfinite, noise_sat, noise_under, noise = raw
    if not (math.isfinite(noise) and math.isfinite(signal)):
        sqnr = float("nan")
    elif noise == 0:
        sqnr = float("inf")
    elif signal == 0:
        sqnr = float("-inf")
    else:
        sqnr = 10 * math.log10(signal / noise)
    share = (lambda part: part / noise) if noise > 0 and math.isfinite(noise) else (lambda _: 0.0)
    return {
        "amax": amax,
        "rms": rms,
        "saturated": sat,
        "underflow": under,
        "sqnr": sqnr,
        "scale": scale,
        "nonfinite": nonfinite,
        "noise_saturated": share(noise_sat),
        "noise_underflow": share(noise_under),
    }


def _merged_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The raw `STATS` vector of one operand quantized in parts (a grouped convolution's one
    GEMM per group, `lowbit.nn.conv._grouped_linear`) from each part's vector and its element
    and nonzero counts: as if the operand had been measured whole, up to ``scale``. ``amax`` the
    largest; the shares ``saturated`` and ``nonfinite`` weighted by the parts' elements,
    ``underflow`` by their nonzero elements; the energies (signal, error, its saturated and
    flushed shares) summed, so ``rms`` and ``sqnr`` are those of the whole operand; ``scale`` the
    median of the parts' (tensorwise: one scale per group; blocks: the median of the medians).
    No host sync."""
    raw = torch.stack([vector for vector, _ in parts])
    elements, nonzero = torch.stack([counts for _, counts in parts]).unbind(1)
    total = elements.sum().clamp(min=1)
    signal = raw[:, 4].sum()
    return torch.stack(
        [
            raw[:, 0].amax(),
            (signal / total).sqrt(),
            (raw[:, 2] * elements).sum() / total,
            (raw[:, 3] * nonzero).sum() / nonzero.sum().clamp(min=1),
            signal,
            raw[:, 5].median(),
            (raw[:, 6] * elements).sum() / total,
            *raw[:, 7:].sum(0),
        ]
    )


def operand_stats(x_hp: torch.Tensor, q: QTensor, gradient: bool = False) -> dict[str, float]:
    """The `STATS` of one operand ``x_hp`` quantized to ``q`` (see the module docstring)."""
    return _finish(operand_stats_tensor(x_hp, q, gradient).tolist())


class StatsCollector:
    """Attaches observers to every low-precision layer of a model and gathers their statistics.

    ``collector.attach()`` before a step, ``collector.collect()`` after it: ``{layer: {operand:
    {stat: value, "format": name, "spec": description}}}``. With gradient accumulation each
    operand keeps the last micro-batch's values unless an earlier micro-batch had more non-finite
    values: a step's overflow can come from any micro-batch, and from the last alone, a clean
    one, `lowbit doctor` flagged nothing and the ``auto`` guard (`AutoPrecision.escalate`) found
    no culprit (it moved every operand of every layer up a rung). Healthy steps keep the last.
    A grouped convolution quantizes each operand in one part per group, G calls in a row per
    forward or backward: each G calls are merged into one measurement of the whole operand
    (`_merged_parts`) before the micro-batch rule applies (the last group alone hid a saturated
    or outlying other group). Micro-batches are not merged so: each is a cast of its own, with
    its own (current) scale, as each step's is.
    ``extra(layer, operand, x_hp, q)`` (optional) is called too, for controllers that measure
    what other formats would do with the same tensor.
    """

    def __init__(self, model: torch.nn.Module, extra=None):
        from lowbit.nn.convert import lowbit_layers

        self.layers = lowbit_layers(model)
        self.extra = extra
        # (layer, operand) -> (raw statistics, element format, spec description)
        self._pending: dict[tuple[str, str], tuple[torch.Tensor, str, str]] = {}
        # (layer, operand) -> the parts of a grouped layer's call so far: (raw, counts) each
        self._parts: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.order: list[str] = []  # layers in the order their forward GEMM ran

    def attach(self) -> None:
        self._pending.clear()
        self._parts.clear()
        self.order = []
        for name, layer in self.layers.items():
            layer.lowbit_state.observer = functools.partial(self._observe, name)

    def detach(self) -> None:
        for layer in self.layers.values():
            layer.lowbit_state.observer = None

    def _observe(self, layer: str, operand: str, x_hp: torch.Tensor, q: QTensor) -> None:
        if operand == "forward.x" and layer not in self.order:
            self.order.append(layer)
        # the spec the layer quantized with now: `auto` changes it between steps, and its guard
        # within a step it retries
        spec = self.layers[layer].lowbit_state.spec.operands()[operand].describe()
        if self.extra is not None:  # each part of a grouped layer's operand (`auto` judges each)
            self.extra(layer, operand, x_hp, q)
        raw = operand_stats_tensor(x_hp, q, gradient=operand.endswith("grad_out"))
        groups = getattr(self.layers[layer], "groups", 1)  # a grouped conv's GEMMs, one a group
        if groups > 1:
            counts = torch.stack([raw.new_tensor(x_hp.numel()), x_hp.count_nonzero().to(raw)])
            parts = self._parts.setdefault((layer, operand), [])
            parts.append((raw, counts))
            if len(parts) < groups:
                return
            raw = _merged_parts(self._parts.pop((layer, operand)))
        earlier = self._pending.get((layer, operand))
        if earlier is not None:  # a later micro-batch (tensors: compared without a host sync)
            raw = torch.where(earlier[0][_NONFINITE] > raw[_NONFINITE], earlier[0], raw)
        self._pending[(layer, operand)] = (raw, q.fmt.name, spec)

    def collect(self) -> dict[str, dict[str, dict]]:
        """Detach, read every pending statistic back in one transfer; ``{}`` when none ran.

        Only the operands of GEMMs that ran: a backward GEMM's operand that reuses the forward's
        quantization (``grad_input.w``, ``grad_weight.x`` of a tensorwise spec) is observed in the
        forward pass, before it is known whether that GEMM runs. A first layer reading the data
        (a CNN's first convolution) computes no input gradient, and the step that stops in its
        forward no gradient at all: without their other operand those are left out, not
        reported as a copy of ``forward.w`` or ``forward.x``."""
        self.detach()
        ran = {(layer, op) for layer, op in self._pending if (layer, _partner(op)) in self._pending}
        for key in set(self._pending) - ran:
            del self._pending[key]
        if not self._pending:
            return {}
        keys = list(self._pending)
        raw = torch.stack([self._pending[k][0].cpu() for k in keys]).tolist()
        out: dict[str, dict[str, dict]] = {}
        for (layer, operand), values in zip(keys, raw, strict=True):
            stats = _finish(values)
            stats["format"], stats["spec"] = self._pending[(layer, operand)][1:]
            out.setdefault(layer, {})[operand] = stats
        self._pending.clear()
        return out


def _partner(operand: str) -> str:
    """The other operand of ``operand``'s GEMM (``grad_input.w`` -> ``grad_input.grad_out``)."""
    gemm = operand.split(".")[0]
    return next(op for op in OPERANDS if op.split(".")[0] == gemm and op != operand)


_NOMINAL: dict = {}


def nominal_stats(spec, shape: tuple[int, int] = (256, 256)) -> dict[str, float]:
    """The `STATS` of an `OperandSpec` on a well-scaled tensor: a seeded standard normal.

    What the format gives when nothing is wrong: e.g. 31.5 dB SQNR for e4m3 tensorwise, 18.8 dB
    and 8.8% of values flushed for MX e2m1 (docs/diagnostics.md names the command). Measured
    errors are judged against it.

    A stochastically rounded spec draws its noise seeded too, in a forked global generator: drawn
    from the global one, its nominal moved from run to run (MX e2m1 with SR: 15.61 and 15.69 dB in
    two probes of the same recipe) and the draw shifted the random numbers of the training
    around it (its SR and dropout), by when the first check asked for it. Only the CPU generator
    is seeded and restored: a GPU run's CUDA generators are left as they are.
    """
    from lowbit.nn.operand import quantize_operand

    key = (spec, tuple(shape))
    if key not in _NOMINAL:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        # the CPU generator alone (x is on the CPU): torch.manual_seed also reseeds every CUDA
        # generator, which fork_rng(devices=[]) does not restore (dropout's stream in a GPU run)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(0)
            q = quantize_operand(x, spec)
            _NOMINAL[key] = operand_stats(x, q)
        # whether the spec's scales put values of a normal tensor past the format's largest
        # (`clips_unbounded`; the margin ignores the fp32 rounding of amax / scale)
        past = x.abs() > float(q.fmt.max) * (1 + 2.0**-20) * _per_element_scale(q)
        _NOMINAL[key]["scaled_past_max"] = bool(past.any())
    return _NOMINAL[key]


def clips_unbounded(nominal: dict) -> bool:
    """Whether a format clips values by an unbounded ratio when they saturate: one whose scales
    put no value of a normal tensor past the format's largest (`nominal_stats`'
    ``scaled_past_max``: a tensor scale from the amax; too small a scale, as delayed scaling's,
    clips outliers by any ratio). Block scales rounded down to a power of two (MX) or to e4m3
    (NVFP4) put values past it by design, each by at most a fixed ratio, which the SQNR
    measures: MX's clip 0.87% of a normal tensor beyond rounding in e2m1, 0.59% in e4m3
    (``saturated``); NVFP4's clip none there, within rounding, but a block scale rounded down
    in e4m3's subnormal range can."""
    return not nominal.get("scaled_past_max", False)


def flatten(stats: dict[str, dict[str, dict]]) -> dict:
    """``{"layer/operand/stat": value}`` for the metrics log (TensorBoard tag ``stats/...``)."""
    return {
        f"{layer}/{operand}/{name}": value
        for layer, operands in stats.items()
        for operand, values in operands.items()
        for name, value in values.items()
    }


def unflatten(record: dict) -> dict[str, dict[str, dict]]:
    """The inverse of `flatten` for one ``stats`` record of ``metrics.jsonl``."""
    out: dict[str, dict[str, dict]] = {}
    for key, value in record.items():
        if key.count("/") != 2:
            continue
        layer, operand, name = key.split("/")
        if isinstance(value, str) and name not in ("format", "spec"):
            value = float(value)  # "inf", "nan" as the log writes them
        out.setdefault(layer, {}).setdefault(operand, {})[name] = value
    return out


def read_records(run_dir, split: str) -> list[dict]:
    """The records of one ``split`` (``stats``, ``auto``, ...) of a run's ``metrics.jsonl``, in
    the order written; none where the run has logged none yet. A line that is not JSON (torn by
    a kill mid-write) is skipped. A folder that is not there is refused: a mistyped path read as
    a run that had logged nothing."""
    import json
    from pathlib import Path

    from lowbit.errors import UsageError

    if not Path(run_dir).is_dir():
        raise UsageError(f"{run_dir}: no such run folder; fix: check the path")
    path = Path(run_dir) / "metrics.jsonl"
    found = []
    if not path.is_file():  # a run that has logged nothing yet
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("split") == split:
            found.append(record)
    return found


def read_stats(run_dir) -> list[tuple[int, dict]]:
    """Every ``stats`` record of a run's ``metrics.jsonl`` as ``(step, nested stats)``."""
    return [(int(record["step"]), unflatten(record)) for record in read_records(run_dir, "stats")]
