"""`lowbit doctor`: a short probe of a recipe, a ranked table of what loses most, and fixes.

The probe trains a few steps (from scratch, or from a run's checkpoint) with a statistics observer
on every low-precision layer (`lowbit.diagnostics.stats`). Each operand's *loss* is how far its
SQNR falls below the SQNR its own spec reaches on a well-scaled tensor of the same shape (a
standard normal: the format's nominal SQNR), so an fp4 operand is not blamed for being fp4 but for
being worse than fp4 usually is. An operand is flagged when

- it saturates (more than `MAX_SATURATED` of its values clipped at the format's max), where
  clipping is unbounded: a tensor scale that is too small (delayed scaling, a stale amax) clips
  outliers by any ratio. Block-scaled formats clip by design (MX's power-of-two scales, rounded
  down, clip ~0.6% of a normal block beyond rounding, 0.9% in e2m1; NVFP4's e4m3 block scales
  clip within rounding there), each value by a bounded ratio that their SQNR already counts
  (`clips_unbounded`). Clipped means beyond rounding (`lowbit.diagnostics.stats.clip_threshold`):
  a value that rounds to the format's largest, as it would with no limit on the range, is not
  counted. One clipped value is more than `MAX_SATURATED` of a tensor under 10**4 elements,
  and it is a loss: clipped by at least half the top step (3.4% of the value in e4m3),
- it underflows (flushes more than `MAX_UNDERFLOW` of its nonzero values beyond the share its
  format flushes on a normal tensor), or
- its SQNR is more than `LOSS_DB` below nominal,

(or holds non-finite values). Its reason is the cause that carries the larger share of the error
energy. The suggestion for a layer is one ``--override`` that puts its flagged operands in bf16,
written as `lowbit train --override` takes it; none for an operand whose high-precision values were
already inf or NaN before its cast (`Row.nonfinite_input`): no format made them, and in bf16 they
stay non-finite; nor for one whose cast lost nothing (`Row.exact`: fp16-low's gradients, whose
values underflowed upstream in fp16 arithmetic).

The probe also flags the known failure patterns:

- non-finite weights: parameters already inf or NaN where the probe starts (a checkpoint of a run
  that diverged), which make every step non-finite in any format: no override is suggested;
- non-finite input: operands whose high-precision values were inf or NaN before their cast, where
  no cast made any (every non-finite operand read them so): a NaN that one layer's input brings
  reaches every later layer and every gradient, and the table flagged them all, with bf16
  overrides for dozens of layers that fix nothing. The flag names the first layer (in forward
  order) that read them, which is where to look;
- loss scale collapse: a dynamic loss scale that fell by `SCALE_COLLAPSE` or more during the
  probe to below fp16's usual start (2^16), or below 1
  (Micikevicius et al. 2018: the scale backs off on every overflow);
- loss scale overflow: probe steps that a dynamic loss scale skipped. What overflowed there is
  the scaled gradient, not its format, so their output-gradient operands are left out of the
  table (judged there, they read non-finite, and bf16 overrides fixed nothing);
- fp16 gradient underflow: fp16 output-gradient operands losing more than `MAX_UNDERFLOW` of
  their nonzero values (the reason loss scaling exists): flushed by their cast to fp16, or, where
  they are fp16 already (``fp16-low``), subnormal (`lowbit.diagnostics.stats`: what underflowed
  upstream is zero there, and cannot be told from a true zero);
- activation outliers growing: a layer's input crest factor ``amax / rms`` large and rising over
  the probe, or over the run's logged statistics with ``--checkpoint`` (the SwiGLU outlier
  amplification of Fishman et al. 2024, "Scaling FP8 training to trillion-token LLMs");
- updates rounded away in pure bf16: the share of bf16 weights whose AdamW update ``|u|`` is
  below half the bf16 spacing of ``|w|`` (``2**(floor(log2 |w|) - 8)``), so ``w + u`` rounds
  back to ``w`` (Zamirai et al. 2020); under round-to-nearest updates only, as stochastic
  rounding and Kahan summation are what keeps such updates.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.diagnostics.stats import OPERANDS, clips_unbounded, nominal_stats, unflatten
from lowbit.errors import UsageError
from lowbit.train.config import replace_atomically, write_atomically

MAX_SATURATED = 1e-4
MAX_UNDERFLOW = 1e-2
LOSS_DB = 6.0
SCALE_COLLAPSE = 2.0**8
DEFAULT_LOSS_SCALE = 2.0**16  # the fp16 recipes' starting scale (GradScaler's)
CREST_OUTLIER = 50.0  # amax / rms of a layer input beyond which it holds outlier channels
CREST_GROWTH = 1.5
ROUNDED_AWAY = 0.1


@dataclass
class Row:
    layer: str
    operand: str
    format: str
    sqnr: float
    nominal: float
    saturated: float
    underflow: float
    amax: float
    crest: float
    reason: str = ""
    lost: float = 0.0  # share of values clipped or flushed beyond the format's nominal shares
    spec: str = ""  # `OperandSpec.describe` of the spec judged: fp8_e4m3/tensor, fp8_e4m3/mx, ...
    # inf or NaN already in the high-precision values, before the cast (`_nonfinite_input`)
    nonfinite_input: bool = False
    # the spec's share flushed of a normal tensor (`nominal_stats`), what `underflow` is judged
    # against (flagged beyond it by `MAX_UNDERFLOW`): 8.8% in MX e2m1, 0 in e4m3 tensorwise
    nominal_underflow: float = 0.0

    @property
    def exact(self) -> bool:
        """Whether its cast lost nothing (SQNR infinite) though it is flagged: fp16-low's fp16
        gradients, flagged for their subnormals (`lowbit.diagnostics.stats`), what is left of
        values that underflowed upstream in the recipe's fp16 arithmetic. A bf16 override of the
        operand recovers none of them (the probe then counts only what its cast flushes: none,
        and the flag is gone, the gradient rounded to bf16); a higher loss scale is the fix."""
        return bool(self.reason) and self.sqnr == math.inf

    @property
    def loss_db(self) -> float:
        if math.isnan(self.sqnr):
            return math.inf
        if math.isinf(self.sqnr):
            return 0.0
        return max(0.0, self.nominal - self.sqnr)


@dataclass
class Diagnosis:
    recipe: str
    steps: int  # probe steps observed, the table's (`stopped` says why fewer than asked)
    rows: list[Row]
    flags: list[dict] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    stopped: str = ""  # why the probe ended before its steps (a non-finite step), or ""
    interrupted: bool = False  # stopped early by a Ctrl-C or SIGTERM (`_interruptible`)
    start_step: int = 0  # the step the probe starts from: the checkpoint's, 0 from scratch
    moved: int = 0  # operands `auto` moved after their last observed step (`_moved_at_the_end`)
    # low-precision layers no probe step ran (`_not_run`): absent from the table, not judged fine
    not_run: list[str] = field(default_factory=list)
    # backward GEMMs of layers that ran which no probe step computed (`_not_computed`)
    not_computed: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[Row]:
        return [r for r in self.rows if r.reason]

    def to_json(self) -> dict:
        def clean(v):
            return v if not isinstance(v, float) or math.isfinite(v) else str(v)

        return {
            "recipe": self.recipe,
            "probe_steps": self.steps,
            "rows": [
                {**{k: clean(v) for k, v in vars(r).items()}, "loss_db": clean(r.loss_db)}
                for r in self.rows
            ],
            "flags": self.flags,
            "suggestions": self.suggestions,
            "override_flags": " ".join(f"--override '{s}'" for s in self.suggestions),
            "probe_loss": [clean(v) for v in self.loss],
            "stopped": self.stopped,
            "moved_after_probe": self.moved,
            "not_run": self.not_run,
            "not_computed": self.not_computed,
        }

    def _not_run_line(self) -> str:
        shown = ", ".join(self.not_run[:3]) + (", ..." if len(self.not_run) > 3 else "")
        return (
            f"{len(self.not_run)} low-precision layers never ran in the probe ({shown}): not "
            "judged, and not in the table (experts no token was routed to, or modules the "
            "model's forward does not call); doctor.json's not_run lists them all"
        )

    def _not_computed_line(self) -> str:
        shown = ", ".join(g.replace("/", " ") for g in self.not_computed[:3])
        shown += ", ..." if len(self.not_computed) > 3 else ""
        return (
            f"not computed, so not in the table: {shown} (a GEMM whose result nothing needs: the "
            "input gradient of a layer reading the model's input, the pixels of a CNN's first "
            "convolution, or the weight gradient of a frozen weight; doctor.json's not_computed "
            "lists them all)"
        )

    def table(self, top: int = 15) -> str:
        width = max([9, *(len(r.spec) for r in self.rows[:top])])
        # a column as wide as the longest name shown: a BERT tagger's run to 43 characters
        named = max([34, *(len(r.layer) for r in self.rows[:top])])
        steps = f"{self.steps} probe step" + ("s" if self.steps != 1 else "")
        lines = [
            f"lowbit doctor: recipe {self.recipe}, {steps}; "
            f"{len(self.flagged)} of {len(self.rows)} low-precision operands flagged",
            *([f"{self.stopped}; the table is of the steps observed"] if self.stopped else []),
            *(
                [
                    f"{self.moved} operands moved to another format at the probe's last step "
                    "(auto's check, or its guard), after it: the table judges them in the spec "
                    "they ran in; more --probe-steps to see them run in the new one"
                ]
                if self.moved
                else []
            ),
            *([self._not_run_line()] if self.not_run else []),
            *([self._not_computed_line()] if self.not_computed else []),
            f"{'#':>3} {'layer':<{named}} {'operand':<21} {'spec':<{width}} {'SQNR':>6} {'nominal':>7} "
            f"{'loss':>6} {'sat':>8} {'under':>8}  reason",
        ]
        if not self.rows:
            lines.append(
                "    (none: no layer of this model is in the recipe's low-precision formats; the "
                "recipe keeps them all in high precision or the model has no layer it converts)"
            )
        for i, r in enumerate(self.rows[:top], 1):
            lines.append(
                f"{i:>3} {r.layer:<{named}} {r.operand:<21} {r.spec:<{width}} {r.sqnr:>6.1f} "
                f"{r.nominal:>7.1f} {r.loss_db:>6.1f} {r.saturated:>8.2e} {r.underflow:>8.2e}  "
                f"{r.reason or '-'}"
            )
        if self.flags:
            lines.append("failure patterns:")
            lines += [f"  [{f['pattern']}] {f['detail']}" for f in self.flags]
        else:
            lines.append("failure patterns: none seen")
        patterns = {flag["pattern"] for flag in self.flags}
        if self.suggestions:
            lines.append("suggested overrides (lowbit train accepts them as they are):")
            lines.append("  " + " ".join(f"--override '{s}'" for s in self.suggestions))
        elif "non-finite-weights" in patterns:
            lines.append(
                "suggested overrides: none (the weights were inf or NaN before the probe: see "
                "non-finite-weights above)"
            )
        elif "non-finite-input" in patterns:
            lines.append(
                "suggested overrides: none (the operands were inf or NaN before their casts: see "
                "non-finite-input above)"
            )
        elif any(r.exact for r in self.flagged):
            lines.append(
                "suggested overrides: none (the flagged gradients underflowed before their "
                "casts, in the recipe's fp16 arithmetic, which no format override changes: see "
                "fp16-gradient-underflow above)"
            )
        else:
            lines.append("suggested overrides: none (no operand flagged)")
        return "\n".join(lines)


def reason_of(stats: dict, nominal: dict) -> str:
    """ "non-finite", "saturation", "underflow", "low SQNR", or "" when the operand is fine."""
    if stats["nonfinite"] > 0:
        return "non-finite"
    sat = clips_unbounded(nominal) and stats["saturated"] > MAX_SATURATED
    under = stats["underflow"] > nominal["underflow"] + MAX_UNDERFLOW
    if sat and under:
        return "saturation" if stats["noise_saturated"] >= stats["noise_underflow"] else "underflow"
    if sat:
        return "saturation"
    if under:
        return "underflow"
    if nominal["sqnr"] - stats["sqnr"] > LOSS_DB:
        return "low SQNR"
    return ""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _nonfinite_input(stats: dict) -> bool:
    """Whether the operand's high-precision values held inf or NaN before its cast. Its ``rms``
    tells: the squares and their sum are taken in float64 (`lowbit.diagnostics.stats`), where
    those of any finite fp32 value stay finite, so ``rms`` is non-finite exactly when an input
    value is; a cast that overflows (fp16's inf beyond 65504) leaves it finite."""
    return not math.isfinite(stats.get("rms", 0.0))


def rows_from(per_step: list[dict], specs: dict) -> list[Row]:
    """One row per (layer, operand), its statistics averaged over the probe steps (a loss that
    persists outranks a one-step transient), ranked: flagged first, then by the share of values
    lost (clipped or flushed beyond the format's nominal shares) and the SQNR below nominal.

    ``specs`` maps each spec description the statistics name (their ``spec``) to its
    `OperandSpec`. An operand is judged in the spec it ends in, on the steps it ran in that spec:
    ``auto`` moves operands between rungs, and its fp8 and MXFP8 rungs share the element format
    ``fp8_e4m3`` (told apart by their specs, ``fp8_e4m3/tensor`` and ``fp8_e4m3/mx``)."""
    series: dict[tuple[str, str], list[dict]] = {}
    for stats in per_step:
        for layer, ops in stats.items():
            for op, s in ops.items():
                if not specs[s["spec"]].is_identity:
                    series.setdefault((layer, op), []).append(s)
    rows = []
    for (layer, op), steps in series.items():
        steps = [s for s in steps if s["spec"] == steps[-1]["spec"]]
        nominal = nominal_stats(specs[steps[-1]["spec"]])
        sqnrs = [s["sqnr"] for s in steps]
        mean = {
            k: _mean([s[k] for s in steps])
            for k in ("saturated", "underflow", "nonfinite", "noise_saturated", "noise_underflow")
        }
        finite = [v for v in sqnrs if math.isfinite(v)]
        if any(math.isnan(v) for v in sqnrs):
            mean["sqnr"] = math.nan
        else:
            mean["sqnr"] = _mean(finite) if finite else math.inf
        amax = max(s["amax"] for s in steps)
        crest = max((s["amax"] / s["rms"] if s["rms"] > 0 else 0.0) for s in steps)
        rows.append(
            Row(
                layer,
                op,
                steps[-1]["format"],
                mean["sqnr"],
                nominal["sqnr"],
                mean["saturated"],
                mean["underflow"],
                amax,
                crest,
                reason_of(mean, nominal),
                spec=steps[-1]["spec"],
                nonfinite_input=any(_nonfinite_input(s) for s in steps),
                nominal_underflow=nominal["underflow"],
            )
        )
        rows[-1].lost = max(0.0, mean["saturated"] - nominal["saturated"]) + max(
            0.0, mean["underflow"] - nominal["underflow"]
        )
    # what a format made (an fp16 cast's overflow) above what merely read non-finite values
    return sorted(rows, key=lambda r: (not r.reason, r.nonfinite_input, -r.lost, -r.loss_db))


def suggestions_for(rows: list[Row]) -> list[str]:
    """One override per layer with flagged operands: those operands in bf16; not those that
    were inf or NaN before their cast (`Row.nonfinite_input`), which stay so in bf16, nor those
    whose cast lost nothing (`Row.exact`), whose values were lost before it."""
    by_layer: dict[str, list[str]] = {}
    for r in rows:
        if r.reason and not r.nonfinite_input and not r.exact:
            by_layer.setdefault(r.layer, []).append(r.operand)
    return [
        f"{layer}=" + ",".join(f"{op}:bf16" for op in OPERANDS if op in ops)
        for layer, ops in by_layer.items()
    ]


# --- the probe -----------------------------------------------------------------------------------


def rounded_away_fraction(optimizer, params_bf16: set[int]) -> tuple[float, int]:
    """Share of bf16 weight elements whose AdamW update is below half their bf16 spacing."""
    below = total = 0
    for group in optimizer.param_groups:
        beta1, beta2 = group.get("betas", (0.9, 0.999))
        eps, lr, wd = group.get("eps", 1e-8), group["lr"], group.get("weight_decay", 0.0)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if id(p) not in params_bf16 or "exp_avg" not in state:
                continue
            step = float(state["step"])
            m = _fp32(state["exp_avg"]) / (1 - beta1**step)
            v = _fp32(state["exp_avg_sq"]) / (1 - beta2**step)
            w = p.detach().float()
            update = lr * (m / (v.sqrt() + eps) + wd * w)
            # bf16 has 8 significant bits: spacing of |w| in [2**e, 2**(e+1)) is 2**(e-7)
            spacing = torch.exp2(torch.floor(torch.log2(w.abs().clamp(min=1e-30))) - 7)
            below += int(((update.abs() < spacing / 2) & (w != 0)).sum())
            total += int((w != 0).sum())
    return (below / total if total else 0.0), total


def _fp32(moment: torch.Tensor) -> torch.Tensor:
    """An Adam moment in fp32: torchao's fp8, 8-bit and 4-bit states (``--optimizer-state``) are
    tensor subclasses without arithmetic of their own, read through their ``dequantize`` as
    their optimizer's step reads them."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(moment):
        return moment.dequantize(torch.float32)
    return moment.float()


def _same_numerics(run, config) -> bool:
    """Whether the probe's ``config`` computes as the ``run`` it starts from: recipe, overrides
    and optimizer-state precision. Recipes are compared as the presets they name, not as
    spelled: ``auto:fp8`` is ``auto``, whose plan the probe goes on with."""
    from lowbit.recipes import same_recipe

    if not same_recipe(run.recipe, config.recipe):
        return False
    fields = ("overrides", "optimizer_state")
    return all(getattr(run, name) == getattr(config, name) for name in fields)


def probe(config, steps: int = 8, checkpoint_dir=None, prepare=None, checkpoint_path=None):
    """Train ``steps`` observed steps of ``config``; returns the `Diagnosis` inputs.

    ``checkpoint_dir``: start from that run's latest checkpoint, or ``checkpoint_path`` (one of
    its checkpoints, e.g. one saved before the run diverged): its weights and optimizer state;
    the recipe is ``config.recipe``. ``prepare(trainer)`` runs after set-up (tests and benchmarks
    use it to build a case, e.g. `lowbit.diagnostics.cases.inject_outliers`).
    """
    from dataclasses import replace

    from lowbit.train.config import read
    from lowbit.train.trainer import NonFiniteLoss, Trainer

    # The trainer's monitor observes every step: it owns the layers' observer, which the `auto`
    # controller also takes at its check steps (a second collector attached here would be
    # replaced there and see nothing).
    config = replace(config, stats_interval=1)
    if checkpoint_dir is not None and read(checkpoint_dir).task != config.task:
        # refused here: the trainer, reading another task's data and tokenizer from the run,
        # would fail on what is missing (e.g. "no saved tokenizer"), not on the cause
        raise UsageError(
            f"{checkpoint_dir}: a run of {read(checkpoint_dir).task}, not {config.task}; fix: drop "
            "--task, the probe of a checkpoint takes the run's task"
        )
    # from a checkpoint: the tokenizer (a tagger's vocabulary and tags) its run trained with
    run_overrides = read(checkpoint_dir).overrides if checkpoint_dir else []
    state = {}

    def check_conversion(built) -> None:
        # before the trainer's warnings (of the override, emulation): a refusal is one line
        _refuse_unused_overrides(built, run_overrides)
        if checkpoint_dir is not None:
            state.update(_fitting_state(built, checkpoint_dir, checkpoint_path))

    trainer = Trainer(
        config, quiet=True, saved_run=checkpoint_dir, check_conversion=check_conversion
    )
    if checkpoint_dir is not None:
        # loaded once the trainer is built, as a run resumed: its optimizer refuses weights
        # already inf or NaN, which the probe of a diverged run is to report (below)
        trainer.model.load_state_dict(state["model"])
        # another recipe's optimizer layout: probe with fresh moments
        with contextlib.suppress(ValueError, KeyError, RuntimeError):
            trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step_idx = int(state["step"])
        if _same_numerics(read(checkpoint_dir), config):
            # the run's own recipe: its dynamic state goes on (auto's plan, which the probe would
            # otherwise start again in bf16; amax histories, the loss scale, master weights)
            trainer.precision.load_state_dict(state["precision"])
            trainer.monitor.load_state_dict(state.get("monitor", {}))
    start_step = trainer.step_idx  # the checkpoint's step, 0 from scratch
    if prepare is not None:
        prepare(trainer)
    # Weights already inf or NaN (a run that diverged before its checkpoint) make every step
    # non-finite whatever the formats: the operands the probe then flags are their consequence,
    # and overrides putting them in bf16 would fix nothing.
    nonfinite_weights = [
        (name, int((~p.isfinite()).sum()), p.numel())
        for name, p in trainer.model.named_parameters()
        if not bool(p.isfinite().all())
    ]
    # where the probe starts: from a checkpoint of the run's own recipe, the run's loss scale,
    # which its earlier overflows may have lowered far below the recipe's initial one
    start_scale = trainer.precision.loss_scale
    from lowbit.nn.convert import lowbit_layers
    from lowbit.recipes.auto import operand_spec
    from lowbit.recipes.recipe import UpdateRounding

    layers = lowbit_layers(trainer.model)
    # Only a round-to-nearest update loses what falls below half the spacing: stochastic
    # rounding keeps it in expectation and Kahan summation in its compensation buffer (they are
    # the pattern's fix, not cases of it).
    recipe = trainer.precision.recipe
    rounds_nearest = (
        recipe.master_dtype is None and recipe.update_rounding is UpdateRounding.NEAREST
    )
    bf16_params = {
        id(p) for p in trainer.model.parameters() if p.dtype == torch.bfloat16 and rounds_nearest
    }
    per_step, scales, losses, rounded, order, skipped = [], [], [], [], [], []
    # every spec an operand may be observed in, by description (the statistics' ``spec``): the
    # layers' own, and under ``auto`` each rung's (its guard moves operands within a step)
    specs = {}
    controller = trainer.monitor.controller
    for rung in controller.rungs if controller is not None else ():
        rung_specs = (operand_spec(rung, op) for op in OPERANDS)
        specs.update({spec.describe(): spec for spec in rung_specs})
    stopped = ""
    interrupted: list[int] = []  # the signal that asked the probe to stop (`_interruptible`)
    with _interruptible(interrupted):
        for _ in range(steps):
            for layer in layers.values():
                specs.update({s.describe(): s for s in layer.spec.operands().values()})
            try:
                out = trainer.step()
            except NonFiniteLoss as error:
                # a step the recipe cannot skip went non-finite: what its operands held is the
                # diagnosis (still held by the observer, or under `auto` read by its guard)
                per_step.append(trainer.monitor.unfinished_stats())
                stopped = f"probe stopped: {error}"
                order = order or list(trainer.monitor.collector.order)  # a first step's own
                break
            record = next((r for split, r in trainer.records if split == "stats"), {})
            per_step.append(unflatten(record))
            # skipped by the loss scale for its gradients alone: a non-finite loss overflowed in the
            # forward pass, which the scale does not touch (its operands' format is the trouble)
            skipped.append(not out["stepped"] and math.isfinite(out["loss"]))
            order = order or list(trainer.monitor.collector.order)
            scales.append(trainer.precision.loss_scale)
            losses.append(out["loss"])
            if bf16_params:
                rounded.append(rounded_away_fraction(trainer.optimizer, bf16_params)[0])
            if interrupted:
                stopped = f"probe interrupted after {len(per_step)} of {steps} steps"
                break
    return {
        "trainer": trainer,
        "per_step": per_step,
        "specs": specs,
        "loss_scales": scales,
        "initial_loss_scale": start_scale,
        "dynamic_scaling": trainer.precision.scaler.enabled,
        "losses": losses,
        "stopped": stopped,
        "rounded_away": rounded,
        "skipped": skipped,
        "order": order,
        "interrupted": bool(interrupted),
        "start_step": start_step,
        "nonfinite_weights": nonfinite_weights,
    }


def _fitting_state(trainer, checkpoint_dir, checkpoint_path=None) -> dict:
    """The state of ``checkpoint_dir``'s latest checkpoint (or ``checkpoint_path``), whose weights
    fit the ``trainer``'s model, their names and shapes: a --model (or --task) other than the
    run's is refused in one line naming the misfit, before the trainer's set-up warns. Not loaded
    here (session 42 did, and the optimizer, built after, refused a diverged run's inf weights
    with a wrong cause)."""
    from lowbit.train import checkpoint
    from lowbit.train.config import read
    from lowbit.train.evaluate import _misfit

    path = checkpoint.find(checkpoint_dir, checkpoint_path)
    state = checkpoint.load(path)
    own, saved = trainer.model.state_dict(), state["model"]
    shapes = [  # in the model's order, as `load_state_dict` names them
        f"size mismatch for {name}: copying a param with shape {saved[name].shape} from "
        f"checkpoint, the shape in current model is {own[name].shape}."
        for name in own
        if name in saved and own[name].shape != saved[name].shape
    ]
    if own.keys() != saved.keys() or shapes:  # as `load_state_dict` would refuse them
        misfit = _misfit(own, saved, RuntimeError("\n".join(shapes)))
        raise UsageError(
            f"{path}: its weights do not fit the model of these settings (model "
            f"{trainer.config.model!r}, the run trained {read(checkpoint_dir).model!r}: "
            f"{misfit}); fix: drop --model, the probe of a checkpoint takes the run's model"
        )
    _refuse_unheld_values(trainer, path, own, saved)
    return state


def _refuse_unheld_values(trainer, path, own: dict, saved: dict) -> None:
    """Refuse a checkpoint whose finite weights the probe's 16-bit parameters cannot hold (an
    fp32 run's 1e6 probed under ``--recipe fp16-low``, past fp16's largest 65504): loaded, they
    became inf, and the probe reported weights non-finite before its first step, with the fix of
    an earlier checkpoint (review R8). A checkpoint's own inf or NaN is the run's, and probed."""
    from lowbit.recipes.recipe import dtype_name

    for name, mine in own.items():
        theirs = saved[name]
        if not (mine.is_floating_point() and theirs.is_floating_point()):
            continue
        largest = torch.finfo(mine.dtype).max
        if largest >= torch.finfo(theirs.dtype).max:
            continue
        finite = theirs[torch.isfinite(theirs)].abs()
        if finite.numel() and (peak := finite.max().item()) > largest:
            recipe = trainer.config.recipe
            raise UsageError(
                f"{path}: {name} holds {peak:g}, past {dtype_name(mine.dtype)}'s largest "
                f"{largest:g}, in which recipe {recipe} keeps the probe's parameters; fix: "
                "probe it under the run's own recipe (drop --recipe) or a bf16 one "
                "(--recipe bf16-low)"
            )


def _refuse_unused_overrides(trainer, run_overrides: list[str]) -> None:
    """Refuse an ``--override`` of the probe that applies to no layer of the model (a misspelt
    name, a module that holds layers, a layer an override before it decides): the probe ran the
    recipe without it, and the check of a fix read as the fix failing, under one warning. Called
    as the trainer's ``check_conversion``, before it warns of the override, so that the refusal
    is one line. A run's own overrides (``--checkpoint``, none given) are the run's, which
    trained with them, and are not refused."""
    import difflib

    from lowbit.nn.convert import lowbit_layers

    report = trainer.precision.conversion_report
    typed = [text for text in report.unused_overrides if text not in (run_overrides or [])]
    if not typed:
        return
    text = typed[0]
    hint = report.unused_hints.get(text)
    if hint is None:  # a misspelt name: the layers nearest to it, as the table names them
        names = list(lowbit_layers(trainer.model))
        near = difflib.get_close_matches(text.split("=")[0], names, n=2, cutoff=0) or names[:2]
        hint = f"the model's layers are named as {', '.join(near)}" if near else "no layer"
    fix = (
        "a PATTERN matching the layer names (as the doctor's table names them), or drop that "
        "--override"
    )
    if text in report.shadowed:  # its layer's operands taken by the overrides before it
        earlier = " and ".join(f"'{first}'" for first in report.shadowed[text])
        fix = f"drop '{text}' or {earlier}, or give first the one you mean"
    raise UsageError(
        f"--override '{text}' applies to no layer of this model ({hint}), so the probe would "
        f"run without it; fix: {fix}"
    )


def _interruptible(interrupted: list[int]):
    """Within: a Ctrl-C (or the SIGTERM a scheduler ends a job with) lets the step under way
    finish, then the probe stops and is diagnosed on the steps it observed, as `lowbit train`
    saves a checkpoint after the step; a second Ctrl-C aborts. Before, a Ctrl-C lost the steps
    already observed (minutes, on a large model) with the whole command. The signal is noted
    in ``interrupted``."""
    import signal
    import sys

    from lowbit.distributed.context import signals_handled
    from lowbit.errors import note_stopping

    def handler(signum, frame):
        if interrupted and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not interrupted:
            interrupted.append(signum)
            # a SIGTERM repeated once the probe has ended is let pass (`raise_terminated`): it
            # raised in the diagnosis, which the command then never wrote
            note_stopping()
            # as `lowbit train` says it (`_stop_message`): a SIGTERM comes from no keyboard
            how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
            again = "" if signum == signal.SIGTERM else " (Ctrl-C again to abort)"
            print(
                f"\n{how}: the probe stops after this step and diagnoses the steps it "
                f"observed{again}",
                file=sys.stderr,
            )

    return signals_handled(handler, signal.SIGINT, signal.SIGTERM)


def failure_patterns(result: dict, history: list | None = None) -> list[dict]:
    """The known failure patterns seen in a probe (see the module docstring)."""
    flags = []
    broken = result.get("nonfinite_weights", [])
    if broken:
        name, count, numel = broken[0]
        flags.append(
            {
                "pattern": "non-finite-weights",
                "detail": f"{len(broken)} weight tensors hold inf or NaN before the probe's "
                f"first step, e.g. {name} ({count} of {numel} values): every operand computed "
                "from them is non-finite in any format, so no override fixes it; fix: probe "
                "(and train again from) an earlier checkpoint, --checkpoint "
                "RUN/checkpoints/step-N.pt, or train from scratch (a lower --lr, or a "
                "higher-precision recipe)",
                "parameters": [b[0] for b in broken],
            }
        )
    if not broken:  # non-finite weights are those inputs' known cause
        flags += _nonfinite_input_flag(result)
    scales = result["loss_scales"]
    overflowed = _skipped(result)
    if overflowed:
        # the scale each skipped step ran at: the probe's start, then the scale after each step
        at = [([result["initial_loss_scale"], *scales])[i] for i in overflowed]
        n = len(result["per_step"])
        fix = (
            "fix: a lower --loss-scale (every probe step overflowed, so the probe trained "
            f"nothing; the scale ended at {scales[-1]:g}) or more --probe-steps"
            if len(overflowed) == n
            else "nothing to fix if it settles (a dynamic loss scale halves on each overflow "
            "until the gradients fit); a lower --loss-scale skips fewer steps"
        )
        flags.append(
            {
                "pattern": "loss-scale-overflow",
                "detail": f"{len(overflowed)} of {n} probe steps overflowed at loss scale "
                f"{max(at):g}" + (f" to {min(at):g}" if min(at) < max(at) else "") + " and were "
                "skipped: their output-gradient operands are left out of the table (the scale "
                f"overflowed, not their format); {fix}",
                "steps": [result.get("start_step", 0) + i + 1 for i in overflowed],
            }
        )
    if _collapsed(result):
        flags.append(
            {
                "pattern": "loss-scale-collapse",
                "detail": f"loss scale fell from {result['initial_loss_scale']:g} to "
                f"{scales[-1]:g} in {len(scales)} steps: gradients overflow at every scale; "
                "fix: bf16 or a higher-precision recipe for the overflowing layers",
            }
        )
    # each fp16 output gradient's underflow averaged over the judged steps, as the table's row
    # (`rows_from`): judged on the last step alone, one step's 1.06% was flagged as "more than 1%"
    # above a table whose worst row read 0.63% (fp16-mixed, tiny LM, 3 probe steps)
    fp16_grads: dict[str, list[dict]] = {}
    for step in _judged_steps(result):
        for layer, ops in step.items():
            for op, s in ops.items():
                if s["format"] == "fp16" and op.endswith("grad_out"):
                    fp16_grads.setdefault(f"{layer}:{op}", []).append(s)
    low = {
        name: steps
        for name, steps in fp16_grads.items()
        if _mean([s["underflow"] for s in steps]) > MAX_UNDERFLOW
    }
    underflowing = list(low)
    if underflowing:
        # a recipe that scales dynamically already: its scale is too low for these gradients
        # (it doubles only after --loss-scale-growth-interval overflow-free steps)
        fix = (
            f"a higher starting --loss-scale (this probe's ended at {scales[-1]:g}) or a shorter "
            "--loss-scale-growth-interval"
            if result["dynamic_scaling"] and scales
            else "dynamic loss scaling"
        )
        flags.append(
            {
                "pattern": "fp16-gradient-underflow",
                "detail": f"{len(underflowing)} fp16 gradient operands flush (or hold as "
                f"subnormals) more than {MAX_UNDERFLOW:.0%} of their values, e.g. "
                f"{underflowing[0]}; fix: {fix}, or bf16 gradients"
                # fp16 already (fp16-low), lost in fp16 arithmetic that no override changes
                + (
                    " (--recipe bf16-low)"
                    if all(s.get("sqnr") == math.inf for steps in low.values() for s in steps)
                    else ""
                ),
                "operands": underflowing,
            }
        )
    growing = _growing_outliers(result["per_step"], history)
    if growing:
        worst = max(growing, key=lambda g: g["crest_end"])
        flags.append(
            {
                "pattern": "activation-outliers-growing",
                "detail": f"{len(growing)} layer inputs have outliers (amax/rms >= "
                f"{CREST_OUTLIER:g}) that grow, worst {worst['layer']} "
                f"{worst['crest_start']:.0f} -> {worst['crest_end']:.0f} (SwiGLU outlier effect, "
                "Fishman et al. 2024); fix: keep those inputs in bf16 or use block scaling",
                "layers": [g["layer"] for g in growing],
            }
        )
    if result["rounded_away"]:
        share = result["rounded_away"][-1]
        if share > ROUNDED_AWAY:
            flags.append(
                {
                    "pattern": "bf16-updates-rounded-away",
                    "detail": f"{share:.0%} of bf16 weights get updates below half their bf16 "
                    "spacing and do not change; fix: --recipe bf16-pure-sr or bf16-pure-kahan "
                    "(which keep such updates), or bf16-low (fp32 master weights)",
                }
            )
    return flags


def _nonfinite_input_flag(result: dict) -> list[dict]:
    """The ``non-finite-input`` pattern (module docstring) of the first judged step with
    non-finite operands, none of them made so by its cast: the first layer, in forward order,
    with a forward operand (else, the gradient flowing back, the last with an output gradient)
    that was inf or NaN before its cast."""
    for i, stats in enumerate(_judged_steps(result)):
        bad = {
            (layer, op): _nonfinite_input(s)
            for layer, ops in stats.items()
            for op, s in ops.items()
            if s.get("nonfinite", 0) > 0
        }
        if not bad:
            continue
        if not all(bad.values()):  # a cast made some: the table names them, with their fixes
            return []
        order = [name for name in result.get("order") or stats if name in stats]
        order += [name for name in stats if name not in order]
        forward = [(n, op) for n in order for op in ("forward.x", "forward.w") if (n, op) in bad]
        backward = [(n, op) for n in reversed(order) for op in OPERANDS if (n, op) in bad]
        layer, op = (forward or backward)[0]
        step = result.get("start_step", 0) + i + 1
        # from a checkpoint the run's step (doctor.json's) is not the probe's
        when = f"step {step} (probe step {i + 1})" if step != i + 1 else f"probe step {step}"
        before = order.index(layer)
        after = f", after {order[before - 1]} ran" if before and forward else ""
        return [
            {
                "pattern": "non-finite-input",
                "detail": f"{layer} read {op} already inf or NaN before its cast at {when}"
                f"{after}: {len(bad)} operands hold them, none made so by its format, so no "
                "format override fixes them; fix: find where the high-precision values overflow "
                "before that layer (a lower --lr, or an earlier --checkpoint)",
                "layer": layer,
                "operand": op,
                "step": step,
            }
        ]
    return []


def _collapsed(result: dict) -> bool:
    """Whether a dynamic loss scale fell below 1, or `SCALE_COLLAPSE`-fold to below fp16's usual
    start (`DEFAULT_LOSS_SCALE`), during the probe. A scale the user started below 1 that stayed
    there collapsed nowhere; nor did one started far too high (``--loss-scale 1e30``), which falls
    256-fold in the default 8 probe steps, halving at each, while still far above any scale the
    gradients fit: that is the scaler's search (`_skipped`), whose fix is a lower start."""
    scales, start = result["loss_scales"], result["initial_loss_scale"]
    if not result["dynamic_scaling"] or not scales or scales[-1] >= start:
        return False
    fell = start / scales[-1] >= SCALE_COLLAPSE and scales[-1] < DEFAULT_LOSS_SCALE
    return scales[-1] < 1 or fell


def _skipped(result: dict) -> list[int]:
    """The probe steps (0-based) that a dynamic loss scale skipped for an overflow of the scaled
    gradients (the loss finite: `probe`), while it searched for a scale the gradients fit; none
    where it collapsed (`_collapsed`): then the gradients overflow at every scale, their format's
    range is the trouble, and the table shows which of them overflowed."""
    if not result["dynamic_scaling"] or _collapsed(result):
        return []
    return [i for i, skip in enumerate(result.get("skipped", ())) if skip]


def _judged_steps(result: dict) -> list[dict]:
    """Each probe step's statistics, less the output-gradient operands of the steps a dynamic
    loss scale skipped: those gradients were scaled too far (they overflow in any format), and
    the scaler, not an override, deals with them. The forward operands of those steps, and the
    weights and inputs the backward GEMMs read, are as any step's."""
    skipped = set(_skipped(result))
    return [
        {
            layer: {
                op: s for op, s in ops.items() if i not in skipped or not op.endswith("grad_out")
            }
            for layer, ops in stats.items()
        }
        for i, stats in enumerate(result["per_step"])
    ]


def _crest(s: dict) -> float:
    return s["amax"] / s["rms"] if s.get("rms", 0) > 0 else 0.0


def _growing_outliers(per_step: list[dict], history: list | None) -> list[dict]:
    series: dict[str, list[float]] = {}
    for stats in [h for _, h in (history or [])] + per_step:
        for layer, ops in stats.items():
            if "forward.x" in ops and "rms" in ops["forward.x"]:
                series.setdefault(layer, []).append(_crest(ops["forward.x"]))
    found = []
    for layer, values in series.items():
        if len(values) < 2:
            continue
        head = sum(values[: max(1, len(values) // 4)]) / max(1, len(values) // 4)
        tail = sum(values[-max(1, len(values) // 4) :]) / max(1, len(values) // 4)
        if tail >= CREST_OUTLIER and tail >= CREST_GROWTH * head:
            found.append({"layer": layer, "crest_start": head, "crest_end": tail})
    return found


def diagnose(
    config, steps: int = 8, checkpoint_dir=None, prepare=None, checkpoint_path=None
) -> Diagnosis:
    """Probe ``config`` and build the ranked table, failure patterns and suggestions."""
    from lowbit.diagnostics.stats import read_stats

    result = probe(config, steps, checkpoint_dir, prepare, checkpoint_path)
    rows = rows_from(_judged_steps(result), result["specs"])
    history = None
    if checkpoint_dir is not None:
        # A run killed after its last checkpoint logged steps the checkpoint never reached (a
        # resume drops them, `lowbit.train.logging`): the probe continues from the checkpoint, so
        # those steps would sit between its history and the probe's, out of time order.
        history = [
            (step, stats)
            for step, stats in read_stats(checkpoint_dir)
            if step <= result["start_step"]
        ]
    return Diagnosis(
        recipe=config.recipe,
        # the steps observed: fewer than asked where a non-finite step or a Ctrl-C stopped it
        steps=len(result["per_step"]),
        rows=rows,
        flags=failure_patterns(result, history),
        # with non-finite weights the flagged operands are their consequence, not a format's
        suggestions=[] if result["nonfinite_weights"] else suggestions_for(rows),
        loss=result["losses"],
        stopped=result.get("stopped", ""),
        interrupted=result.get("interrupted", False),
        start_step=result["start_step"],
        moved=_moved_at_the_end(result["trainer"], rows),
        not_run=_not_run(result["trainer"], result["per_step"]),
        not_computed=_not_computed(result["per_step"]),
    )


def _not_computed(per_step: list[dict]) -> list[str]:
    """``LAYER/GEMM`` of each backward GEMM that no probe step computed while its layer's other
    backward GEMM ran: autograd computes no input gradient for a layer whose input needs none
    (the model's own input: a CNN's first convolution reading the pixels), nor a weight gradient
    for a weight that needs none. Those GEMMs have no statistics and are not judged; a layer no
    backward reached (a probe stopped in its forward) is not named."""
    ran: dict[str, set[str]] = {}
    for stats in per_step:
        for layer, ops in stats.items():
            ran.setdefault(layer, set()).update(op.split(".")[0] for op in ops)
    backward = ("grad_input", "grad_weight")
    return [
        f"{layer}/{gemm}"
        for layer, gemms in ran.items()
        for gemm in backward
        if gemm not in gemms and any(other in gemms for other in backward)
    ]


def _not_run(trainer, per_step: list[dict]) -> list[str]:
    """The low-precision layers no probe step observed: never called in the forward pass (a
    mixture-of-experts layer's experts that no token was routed to, a module the forward
    skips). They have no statistics, so without this they vanished from the table and the
    count of operands judged, as if they were fine."""
    from lowbit.nn.convert import lowbit_layers

    ran = {layer for stats in per_step for layer in stats}
    return [
        name
        for name, layer in lowbit_layers(trainer.model).items()
        if name not in ran and not layer.lowbit_state.spec.is_identity
    ]


def _moved_at_the_end(trainer, rows: list[Row]) -> int:
    """How many operands ``auto`` put in another spec than the one the table judges them in: its
    check at the probe's last step decides after the step ran (from scratch, a one-step probe is
    its first check, run in bf16), so they never ran in the spec the run goes on with."""
    from lowbit.nn.convert import lowbit_layers

    if trainer.monitor.controller is None:
        return 0
    layers = lowbit_layers(trainer.model)
    return sum(
        layers[r.layer].lowbit_state.spec.operands()[r.operand].describe() != r.spec for r in rows
    )


# What `write_outputs` writes: the whole table, then its heat map
OUTPUT_FILES = ("doctor.json", "doctor.png")


def write_outputs(diagnosis: Diagnosis, folder) -> tuple[Path, Path]:
    """``doctor.json`` (the whole table) and ``doctor.png`` (SQNR loss, layers x operands)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = (folder / name for name in OUTPUT_FILES)
    # whole or not at all: an interrupted or full-disk write left a torn doctor.json
    write_atomically(json_path, json.dumps(diagnosis.to_json(), indent=2) + "\n")
    # the heat map too (a torn doctor.png beside a whole report)
    replace_atomically(png_path, lambda tmp: heatmap(diagnosis, tmp))
    return json_path, png_path


# a flagged cell's label in the heat map, as the table's columns name the reasons
_CELL_LABELS = {
    "saturation": "sat",
    "underflow": "under",
    "low SQNR": "SQNR",
    "non-finite": "nonfin",
}


def heatmap(diagnosis: Diagnosis, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({r.layer for r in diagnosis.rows}, key=_layer_key)
    if not layers:  # nothing was quantized: say so instead of an empty heat map
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{diagnosis.recipe}: no low-precision operands", ha="center")
        fig.savefig(path, dpi=120, format="png")
        plt.close(fig)
        return
    grid = np.full((len(layers), len(OPERANDS)), np.nan)
    for r in diagnosis.rows:
        grid[layers.index(r.layer), OPERANDS.index(r.operand)] = min(r.loss_db, 60.0)
    # at least 3 inches: the colour bar's label, drawn along it, was cut off for few layers
    fig, ax = plt.subplots(figsize=(8, max(3.0, 1.5 + 0.28 * len(layers))))
    # the scale reaches at least the flagging threshold: scaled to the largest loss alone, a
    # healthy probe's 0.4 dB of noise was drawn black, darker than the flagged cells
    top = max(LOSS_DB, float(np.nanmax(grid)))
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0, vmax=top)
    ax.set_xticks(range(len(OPERANDS)), OPERANDS, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    for r in diagnosis.rows:
        if r.reason:  # framed and named: most flags are no SQNR loss (underflow, saturation)
            x, y = OPERANDS.index(r.operand), layers.index(r.layer)
            frame = plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="tab:blue")
            ax.add_patch(frame)
            dark = grid[y, x] > top / 2
            label = _CELL_LABELS[r.reason]
            ax.text(
                x,
                y,
                label,
                ha="center",
                va="center",
                fontsize=6,
                weight="bold",
                color="cyan" if dark else "tab:blue",
            )
    for name in diagnosis.not_computed:  # blank: say why, in the table's words
        layer, gemm = name.rsplit("/", 1)
        for x, op in enumerate(OPERANDS):
            if op.startswith(gemm + ".") and layer in layers:
                y = layers.index(layer)
                ax.text(x, y, "not\ncomputed", ha="center", va="center", fontsize=6, color="gray")
    fig.colorbar(image, ax=ax, label=f"SQNR below nominal (dB)\nflagged from {LOSS_DB:g}")
    ax.set_title(f"lowbit doctor: {diagnosis.recipe}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _layer_key(name: str):
    return [int(t) if t.isdigit() else t for t in name.replace(".", " ").split()]
