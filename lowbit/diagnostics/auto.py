"""Dynamic precision: the controller behind the ``auto`` recipe, and the non-finite step guard.

Every ``check_interval`` steps (and at the first step) the controller observes one training step:
each converted layer's six GEMM operands are quantized, in addition to their current format, to
every rung of the ladder (`lowbit.recipes.auto.LADDER`, from the budget up to bf16), and the
statistics of `lowbit.diagnostics.stats` are measured for each. An operand *passes* a rung when,
on that step's real tensor (on each of them, with gradient accumulation),

    SQNR >= min_sqnr (24 dB: fp8 e4m3 and e5m2 on well-scaled tensors give ~31 and ~25.6 dB), or
           where it is lower, `SQNR_MARGIN_DB` below the rung's nominal (MX fp4 ~18.8 dB and
           e5m2 gradients ~25.6 dB: floors ~15.8 and ~22.6 dB),
    saturated fraction at most max_saturated (1e-4) where clipping is unbounded (a tensor scale;
    block scales clip a bounded ratio by design, which SQNR counts: `clips_unbounded`), flushed
    fraction of the nonzero values at most max_underflow (1e-2) above what the rung flushes on a
    normal tensor, and nothing non-finite.

An operand whose every value is zero in the check step (a zero-initialised weight, the gradient
that flows back through it) passes every rung: zeros are exact in any format. That says nothing
of the values it will hold, so it keeps its rung until a check sees some (until session 31 the
first check put such operands on the cheapest rung, fp4 under ``auto:fp4``, for
``check_interval`` steps).

The operand's target is the cheapest rung it passes. It moves *up* at once when the target is
above its current rung (saturation, outliers, lost SQNR), and *down* only after ``patience``
consecutive checks agree that a cheaper rung passes (hysteresis: a layer moves down again once it
has been stable). A layer whose input is the model's own input (raw data, e.g. a CNN's first
convolution reading the pixels) stays in bf16: its rounding error is a fixed distortion of the
data, which an SQNR threshold does not judge (`AutoPrecision._watch_inputs`). Layers that an
override converted keep the override's spec. The plan (layer -> operand -> rung) is logged at
every change, kept in checkpoints (each layer's spec is saved with its `LayerState`, and the
controller's counters and history with the trainer state), and restored on resume and evaluation.

Guard: the trainer checks the loss and the gradients before the optimizer step. When something is
non-finite, nothing has been applied yet, so the step is *rolled back* (gradients dropped) and
retried on the same batches with an observer attached; the operands that saturated (clipped, or
overflowed to inf) move up a rung; when none did, the layer that ran just before the first layer
whose input is non-finite (in forward order) moves up; only operands the plan may move move (an
override's stay, and a fault located in one moves nothing); where nothing located the fault, every
operand does. At most ``max_retries`` retries; then the trainer's usual handling applies.

Data parallelism (DDP, FSDP): each rank measures its own share of the batch (a tensorwise rung with
the scale the ranks agree on, as the layer quantizes it), so the ranks agree
(`AutoPrecision._agreed`, through the scale agreement's all-reduce): every operand takes the highest
rung any rank's data needs, the guard's finite check is one decision (`all_finite`), and the guard
moves up what overflowed on any rank. The plan is the same on every rank, as the checkpoint (rank
0's) keeps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import torch

from lowbit.diagnostics.stats import (
    OPERANDS,
    StatsCollector,
    _finish,
    clips_unbounded,
    nominal_stats,
    operand_stats_tensor,
    read_records,
)
from lowbit.errors import UsageError
from lowbit.nn.operand import scale_agreement
from lowbit.recipes.auto import (
    RUNGS,
    auto_recipe,
    budget_of,
    operand_spec,
    rung_bits,
    running_rungs,
)
from lowbit.recipes.recipe import GemmSpec, LayerSpec

MIN_SQNR_DB = 24.0
SQNR_MARGIN_DB = 3.0
MAX_SATURATED = 1e-4
MAX_UNDERFLOW = 1e-2
CHECK_INTERVAL = 25
PATIENCE = 2
MAX_RETRIES = 3


def judge(
    stats: dict,
    min_sqnr: float = MIN_SQNR_DB,
    max_saturated: float = MAX_SATURATED,
    max_underflow: float = MAX_UNDERFLOW,
    nominal: dict | None = None,
):
    """None when ``stats`` pass, else the reason: non-finite, saturation, underflow, low SQNR.

    ``nominal`` holds what the format gives on a well-scaled tensor (`nominal_stats`): MX e2m1
    flushes ~9% of a normal block and clips ~0.9% beyond rounding, at ~18.8 dB. Saturation
    fails where clipping is unbounded (`clips_unbounded`: a tensor scale) and more than
    ``max_saturated`` clips; flushing fails beyond the nominal share by more than
    ``max_underflow``; SQNR fails below ``min_sqnr``
    or below `SQNR_MARGIN_DB` under the nominal, whichever is lower (so e5m2's ~25.6 dB nominal
    leaves ~22.6 dB, as fp4's ~18.8 dB leaves ~15.8 dB). Underflow
    is judged on its own: SQNR weighs elements by energy, so a tensor whose bulk is flushed to
    zero under a few outliers can keep a high SQNR while losing most of its values.
    """
    nominal = nominal or {"saturated": 0.0, "underflow": 0.0, "sqnr": math.inf}
    if stats["nonfinite"] > 0 or math.isnan(stats["sqnr"]):
        return "non-finite"
    if clips_unbounded(nominal) and stats["saturated"] > max_saturated:
        return "saturation"
    if stats["underflow"] > nominal["underflow"] + max_underflow:
        return "underflow"
    if stats["sqnr"] < min(min_sqnr, nominal["sqnr"] - SQNR_MARGIN_DB):
        return "low SQNR"
    return None


@dataclass
class AutoPrecision:
    """The ``auto`` controller over a converted model (see the module docstring)."""

    model: torch.nn.Module
    budget: str = "fp8"
    check_interval: int = CHECK_INTERVAL
    min_sqnr: float = MIN_SQNR_DB
    max_saturated: float = MAX_SATURATED
    max_underflow: float = MAX_UNDERFLOW
    patience: int = PATIENCE
    max_retries: int = MAX_RETRIES
    rungs: tuple[str, ...] = field(default=())
    plan: dict = field(default_factory=dict)
    stable: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    checked: bool = False
    input_layers: set = field(default_factory=set)  # layers that read the model's input
    # (layer, operand) of the GEMMs that did not run in the last check (`_note_idle`)
    idle: set = field(default_factory=set)

    def __post_init__(self):
        from lowbit.nn.convert import lowbit_layers

        self._check_options()
        self.rungs = self.rungs or RUNGS[RUNGS.index(self.budget) :]
        # Operands whose spec an override chose (`lowbit train --override`) keep it: a whole
        # layer's, or those an OPERAND:FORMAT override names (the layer's others are planned).
        self.layers = {
            name: layer
            for name, layer in lowbit_layers(self.model).items()
            if len(layer.lowbit_state.fixed_operands) < len(OPERANDS)
        }
        self.fixed = {
            name: {
                op: spec
                for op, spec in layer.lowbit_state.spec.operands().items()
                if op in layer.lowbit_state.fixed_operands
            }
            for name, layer in self.layers.items()
        }
        # (layer, operand) -> one {rung: raw stats} per quantization in the check step: each
        # micro-batch of gradient accumulation quantizes the operand anew
        self._measured: dict[tuple[str, str], list[dict[str, torch.Tensor]]] = {}
        # Between `begin` and `finish_check` (retried attempts included): only then is the ladder
        # measured; the collector also serves statistics steps and the guard's observed retries,
        # where quantizing every operand to every rung would triple a step's cost for nothing.
        self._checking = False
        self._input_hooks: list = []
        self.collector = StatsCollector(self.model, extra=self._what_if)
        for name, layer in self.layers.items():
            layer.lowbit_state.dynamic_spec = True
            planned = (op for op in OPERANDS if op not in self.fixed[name])
            self.plan.setdefault(name, {op: self.rungs[-1] for op in planned})
        self.apply()

    def _check_options(self) -> None:
        """One line for a bad option, before it fails later: a check interval of 0 divided by
        zero at the second step, an unknown budget was a ValueError of ``tuple.index``, and a
        threshold given as a string failed at the first check's comparison."""
        auto_recipe(self.budget)  # an unknown budget: the recipe's own one-line error

        def whole(name: str, least: int, example: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UsageError(
                    f"auto {name} must be a whole number of at least {least}, got {value!r}; "
                    f"fix: e.g. {example}"
                )

        def share(name: str, example: float) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
                raise UsageError(
                    f"auto {name} is a share of the elements, from 0 to 1, got {value!r}; fix: "
                    f"e.g. {example:g}"
                )

        whole("check_interval", 1, CHECK_INTERVAL)
        whole("patience", 1, PATIENCE)
        whole("max_retries", 0, MAX_RETRIES)
        share("max_saturated", MAX_SATURATED)
        share("max_underflow", MAX_UNDERFLOW)
        sqnr = self.min_sqnr
        if isinstance(sqnr, bool) or not isinstance(sqnr, Real) or not math.isfinite(sqnr):
            raise UsageError(
                f"auto min_sqnr is a finite number of dB, got {sqnr!r}; fix: e.g. {MIN_SQNR_DB:g}"
            )

    # --- plan -> layers ----------------------------------------------------------------------

    def layer_spec(self, layer: str) -> LayerSpec:
        ops = {op: operand_spec(rung, op) for op, rung in self.plan[layer].items()}
        ops.update(self.fixed[layer])
        return LayerSpec(
            forward=GemmSpec(ops["forward.x"], ops["forward.w"]),
            grad_input=GemmSpec(ops["grad_input.grad_out"], ops["grad_input.w"]),
            grad_weight=GemmSpec(ops["grad_weight.grad_out"], ops["grad_weight.x"]),
        )

    def apply(self) -> None:
        for name, layer in self.layers.items():
            layer.lowbit_state.spec = self.layer_spec(name)

    def summary(self) -> dict:
        """Counts per rung, the share of operands at 8 bits or below, the mean bits (None for a
        plan of no operands, every layer kept by overrides: no share, and not 0 bits), of the
        operands whose GEMMs run (not `idle`: a CNN's first convolution computes no input
        gradient, so 10 of the digits CNN's 12 planned operands run)."""
        rungs = running_rungs(self.plan, self.idle)
        out = {f"n_{r}": sum(1 for x in rungs if x == r) for r in self.rungs}
        low = sum(1 for r in rungs if rung_bits(r) <= 8.25)
        out["frac_8bit_or_below"] = low / len(rungs) if rungs else None
        out["mean_bits"] = sum(rung_bits(r) for r in rungs) / len(rungs) if rungs else None
        return out

    def describe(self) -> str:
        """The plan in one line, for a run's summary: operands per rung, mean bits, and the
        steps it changed at (``87 fp4, 20 fp6, 19 fp8 of 126 operands (5.13 mean bits); set at
        step 1, changed at 25, 50``); what moved and why is in the run's ``moves`` records."""
        counts = self.summary()
        total = sum(counts[f"n_{rung}"] for rung in self.rungs)
        if not total:
            return "no operand planned (overrides decide every layer)"
        rungs = ", ".join(
            f"{counts[f'n_{rung}']} {rung}" for rung in self.rungs if counts[f"n_{rung}"]
        )
        steps = [str(entry["step"]) for entry in self.history]
        when = f"; set at step {steps[0]}" if steps else "; not checked yet"
        when += f", changed at {', '.join(steps[1:])}" if len(steps) > 1 else ""
        return f"{rungs} of {total} operands ({counts['mean_bits']:.2f} mean bits){when}"

    # --- checks ------------------------------------------------------------------------------

    def wants_check(self, step: int) -> bool:
        """Whether the step numbered ``step`` (1-based) is observed."""
        return not self.checked or step % self.check_interval == 0

    def _what_if(self, layer: str, operand: str, x_hp: torch.Tensor, q) -> None:
        from lowbit.nn.linear import batch_axis
        from lowbit.nn.operand import quantize_operand

        if not self._checking or not self._controls(layer, operand):  # observed only
            return
        measured = {}
        x = x_hp.detach()
        # as the layer quantizes it: under data parallelism a tensorwise rung scales this rank's
        # share by the amax agreed over the ranks (by its own, a narrow share passed fp8 that the
        # agreed scale of a wider one flushes)
        batch = batch_axis(operand)
        for rung in self.rungs:
            spec = operand_spec(rung, operand)
            measured[rung] = operand_stats_tensor(x, quantize_operand(x, spec, batch=batch))
        self._measured.setdefault((layer, operand), []).append(measured)

    def held(self) -> dict[str, str]:
        """Why the operands that no check moves are where they are, as the run's ``moves``
        records write it (``LAYER/OPERAND``: ``bf16: kept, ...``): those of the layers that read
        the model's input (`_watch_inputs`), found at the first check."""
        return {
            f"{layer}/{op}": f"{rung}: kept, the layer reads the model's input (raw data)"
            for layer in sorted(self.input_layers)
            for op, rung in self.plan.get(layer, {}).items()
            if (layer, op) not in self.idle
        }

    def _controls(self, layer: str, operand: str) -> bool:
        """Whether the plan may move ``operand`` of ``layer``: not one an override set (absent
        from the plan) nor one of a layer that reads the model's input (`_watch_inputs`)."""
        return operand in self.plan.get(layer, ()) and layer not in self.input_layers

    def begin(self) -> None:
        self._measured.clear()
        self._checking = True
        self.collector.attach()
        if not self.checked and not self._input_hooks:
            self._watch_inputs()

    def _watch_inputs(self) -> None:
        """Until the first check is decided: note the layers whose input is a tensor the model was
        called with, or a view of it (raw data: a CNN's first convolution reads the pixels, an
        MLP's first layer the flattened image). Their rounding error is not noise that changes
        from step to step but a fixed distortion of the data itself (per-tensor e4m3 moves 11 of
        the 17 pixel levels of the digits and merges two, with an SQNR the threshold passes), so
        they stay in bf16, as the first layer of a low-precision network usually does. A
        language model's layers read embeddings and norms, never the token ids, so none of them
        is one."""
        model_inputs: list[torch.Tensor] = []

        def note_model_inputs(module, args, kwargs):
            tensors = (*args, *kwargs.values())
            model_inputs[:] = [t for t in tensors if isinstance(t, torch.Tensor)]

        def check_layer(name):
            def hook(module, args):
                if args and isinstance(args[0], torch.Tensor):
                    storage = args[0].untyped_storage().data_ptr()  # the input or a view of it
                    if any(t.untyped_storage().data_ptr() == storage for t in model_inputs):
                        self.input_layers.add(name)

            return hook

        self._input_hooks = [
            self.model.register_forward_pre_hook(note_model_inputs, with_kwargs=True)
        ]
        for name, layer in self.layers.items():
            self._input_hooks.append(layer.register_forward_pre_hook(check_layer(name)))

    def finish_check(self, step: int) -> tuple[dict, list]:
        """Decide from the observed step; returns (current stats, changes made)."""
        stats = self.collector.collect()
        self._note_idle(stats)
        samples = [(key, m) for key, ms in self._measured.items() for m in ms]
        verdicts = {}
        if samples:
            flat = torch.stack([m[r].cpu() for _, m in samples for r in self.rungs]).tolist()
            for i, (key, _) in enumerate(samples):
                results = {
                    rung: _finish(flat[i * len(self.rungs) + j])
                    for j, rung in enumerate(self.rungs)
                }
                measured = results[self.rungs[-1]]
                if measured["amax"] == 0 and measured["nonfinite"] == 0:
                    continue  # all zeros: no evidence for any rung (module docstring)
                # a rung must pass on every micro-batch it quantized (judged by the last alone,
                # an outlier in an earlier one went unseen), as on every rank's share (`_agreed`)
                rung, failures = self._target(key[1], results)
                index = self.rungs.index(rung)
                if key not in verdicts or index > self.rungs.index(verdicts[key][0]):
                    verdicts[key] = rung, failures
        targets = self._agreed({key: self.rungs.index(t) for key, (t, _) in verdicts.items()})
        changes = []
        for key, index in targets.items():
            failures = verdicts[key][1] if key in verdicts else {}
            change = self._decide(*key, self.rungs[index], failures)
            if change:
                changes.append(change)
        self._measured.clear()
        self._checking = False
        first = not self.checked
        self.checked = True
        for handle in self._input_hooks:
            handle.remove()
        if changes or first:
            self.apply()
            self.history.append({"step": step, **self.summary(), "changes": changes})
        return stats, changes

    def _note_idle(self, stats: dict) -> None:
        """Note the planned operands that the check step's ``stats`` (`StatsCollector.collect`)
        leave out, those of GEMMs that did not run (an input gradient of a layer whose input
        needs none), as `idle`: the plan keeps their rungs, its counts leave them out. A step
        that observed nothing tells nothing, and changes nothing."""
        if stats:
            self.idle = {
                (layer, op)
                for layer, ops in self.plan.items()
                for op in ops
                if op not in stats.get(layer, {})
            }

    def _target(self, operand: str, results: dict) -> tuple[str, dict]:
        """The cheapest rung whose ``results`` pass, and why each cheaper one failed."""
        failures = {}
        for rung in self.rungs:
            nominal = nominal_stats(operand_spec(rung, operand))
            why = judge(
                results[rung], self.min_sqnr, self.max_saturated, self.max_underflow, nominal
            )
            if why is None:
                return rung, failures
            failures[rung] = why
        return self.rungs[-1], failures

    def _agreed(self, chosen: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
        """The highest of ``chosen`` (operand -> rung index, or a 0/1 mark) over the ranks of a
        data-parallel job, for every operand some rank chose. Each rank measures its own share of
        the batch, so alone the ranks would pick different formats for one layer (seen under
        DDP with ``auto:fp4``: 97 and 95 operands on fp4), train it in both and save rank 0's
        plan; the highest is what every rank's data allows. One process: ``chosen`` itself."""
        agreement = scale_agreement()
        if not agreement.active:
            return chosen
        # every rank lists the same operands in the same order: the plan's, which is the same
        order = [(layer, op) for layer, ops in self.plan.items() for op in ops]
        mine = torch.tensor([float(chosen.get(key, -1)) for key in order])
        agreed = agreement.amax(mine).tolist()
        return {key: int(value) for key, value in zip(order, agreed, strict=True) if value >= 0}

    def _decide(self, layer: str, operand: str, target: str, failures: dict):
        current = self.plan[layer][operand]
        reason = ""
        key = (layer, operand)
        up = self.rungs.index(target) > self.rungs.index(current)
        down = self.rungs.index(target) < self.rungs.index(current)
        if not self.checked or up:
            self.stable[key] = 0
            if target == current:
                return None
            # up although this rank's share passed at `current`: another rank's data needed it
            reason = failures.get(current, "another rank's data") if up else _first_plan(failures)
        elif down:
            self.stable[key] = self.stable.get(key, 0) + 1
            if self.stable[key] < self.patience:
                return None
            self.stable[key] = 0
            reason = f"stable for {self.patience} checks"
        else:
            self.stable[key] = 0
            return None
        self.plan[layer][operand] = target
        return {"layer": layer, "operand": operand, "from": current, "to": target, "why": reason}

    # --- guard -------------------------------------------------------------------------------

    def escalate(self, stats: dict, step: int, retried: bool = True) -> list:
        """After a non-finite step observed with ``stats``: move the offending operands up, for
        the step's next attempt, or, ``retried=False``, for the steps after it (the guard gave
        up on this one: its `max_retries` are spent), as each move's ``why`` says.

        Only operands the plan may move (`_controls`) move. Where the fault is located (an
        operand that saturated, or the first layer whose input is non-finite) and lies in none of
        them (an operand an override pinned, a layer that reads the model's input, the model's
        input itself), nothing moves: until session 33 every operand of every layer then moved up
        a rung at each retry, costing precision everywhere for a fault none of their rungs could
        fix. Every operand moves only where no rank located the fault."""
        offenders = [
            (layer, op)
            for layer, ops in stats.items()
            for op, s in ops.items()
            if s["saturated"] > self.max_saturated  # includes IEEE overflow to inf
            and self._clips_unbounded(layer, op)  # not MX's by-design ~0.6% (fp4: ~0.9%)
        ]
        located = bool(offenders)
        if not offenders:  # the layer whose output turned the next layer's input non-finite
            order = self.collector.order
            first = next(
                (i for i, name in enumerate(order) if stats[name]["forward.x"]["nonfinite"] > 0),
                None,
            )
            located = first is not None  # the first layer's: the input came non-finite
            if first:
                offenders = [(order[first - 1], op) for op in OPERANDS]
        offenders = [(layer, op) for layer, op in offenders if self._controls(layer, op)]
        offenders, located = self._agreed_offenders(offenders, located)
        if not located:
            offenders = [(layer, op) for layer, ops in self.plan.items() for op in ops]
        changes = []
        for layer, op in offenders:
            current = self.plan[layer][op]
            index = self.rungs.index(current)
            if index + 1 < len(self.rungs):
                self.plan[layer][op] = self.rungs[index + 1]
                self.stable[(layer, op)] = 0
                changes.append(
                    {"layer": layer, "operand": op, "from": current, "to": self.rungs[index + 1]}
                )
                changes[-1]["why"] = (
                    "non-finite step retried"
                    if retried
                    else f"non-finite step, not retried: the guard's retries ({self.max_retries}) "
                    "were spent"
                )
        if changes:
            self.apply()
            self.history.append({"step": step, **self.summary(), "changes": changes})
        return changes

    def _agreed_offenders(self, offenders: list, located: bool) -> tuple[list, bool]:
        """The operands any rank found offending, and whether any rank located the fault, in one
        all-reduce (`_agreed`): a rank that moved every operand up while another moved one would
        train the model in other formats from then on."""
        agreement = scale_agreement()
        if not agreement.active:
            return offenders, located
        order = [(layer, op) for layer, ops in self.plan.items() for op in ops]
        mine = torch.tensor([float(key in offenders) for key in order] + [float(located)])
        *marks, anywhere = agreement.amax(mine).tolist()
        return [key for key, mark in zip(order, marks, strict=True) if mark > 0], anywhere > 0

    def _clips_unbounded(self, layer: str, op: str) -> bool:
        """Whether ``op`` of ``layer`` computes in a format whose saturation is a loss, not by
        design (`clips_unbounded`). Read from the layer's spec, so that an override's MX operand,
        which clips a share of every tensor by design, is not taken for the step's fault."""
        spec = self.collector.layers[layer].lowbit_state.spec.operands()[op]
        return clips_unbounded(nominal_stats(spec))

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "budget": self.budget,
            "plan": {k: dict(v) for k, v in self.plan.items()},
            "stable": {f"{k[0]}|{k[1]}": v for k, v in self.stable.items()},
            "history": list(self.history),
            "checked": self.checked,
            "input_layers": sorted(self.input_layers),
            "idle": sorted(f"{layer}|{op}" for layer, op in self.idle),
        }

    def load_state_dict(self, state: dict) -> None:
        self.plan = {k: dict(v) for k, v in state["plan"].items()}
        self.stable = {tuple(k.rsplit("|", 1)): v for k, v in state["stable"].items()}
        self.history = list(state["history"])
        self.checked = bool(state["checked"])
        self.input_layers = set(state.get("input_layers", ()))  # absent before they were kept
        # absent before session 41: every operand counts until the next check notes them
        self.idle = {tuple(k.rsplit("|", 1)) for k in state.get("idle", ())}
        self.apply()


def _first_plan(failures: dict) -> str:
    """Why the first check put an operand on its rung: the cheaper rungs it failed, and how
    (``initial plan: fp4 underflow, fp6 low SQNR``); the cheapest rung needs no reason."""
    failed = ", ".join(f"{rung} {why}" for rung, why in failures.items())
    return f"initial plan: {failed}" if failed else "initial plan: the cheapest rung passes"


def controller_for(model: torch.nn.Module, recipe, **kw) -> AutoPrecision | None:
    """The controller of an ``auto`` recipe, None for other recipes."""
    budget = budget_of(recipe)
    return None if budget is None else AutoPrecision(model, budget, **kw)


def all_finite(loss: float, parameters) -> bool:
    """Whether the loss and every gradient are finite (one host sync), on every rank alike.

    An FSDP rank holds a shard of each gradient: judged by its own shard, the rank holding an
    inf rolled the step back and ran it again alone, its collectives unmatched by the ranks that
    stepped on. The ranks agree as they do on a loss-scaler skip (the loss is already the mean
    over the ranks, so a non-finite one is every rank's)."""
    if not math.isfinite(loss):
        return False
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = any(hasattr(g, "to_local") for g in grads)
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor: the shard
    finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    # DDP's gradients are the same on every rank (all-reduced): only shards need the agreement
    return scale_agreement().all_finite(finite) if sharded else finite


def plan_over_time(run_dir, until_step: int | None = None) -> str:
    """The ``auto`` plan of a run at each change, from its ``metrics.jsonl`` (a Markdown table):
    step, operands per rung, share at 8 bits or below, mean bits, changes, retried attempts;
    "" for a run of another recipe. A folder that is not there is refused (`read_records`).

    ``until_step``: only the changes up to that step, e.g. a checkpoint's: a run killed after its
    last checkpoint logged changes the checkpoint never reached (a resume drops them)."""
    records = [
        record
        for record in read_records(run_dir, "auto")
        if until_step is None or record["step"] <= until_step
    ]
    if not records:
        return ""
    rungs = [k[2:] for k in records[0] if k.startswith("n_")]
    head = ["step", *rungs, "<= 8 bits", "mean bits", "changes", "retries"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [str(r["step"]), *(str(r.get(f"n_{rung}", 0)) for rung in rungs)]
        # absent where the plan had no operands (every layer an override's): the log drops None
        share, bits = r.get("frac_8bit_or_below"), r.get("mean_bits")
        cells += [
            "n/a" if share is None else f"{share:.0%}",
            "n/a" if bits is None else f"{bits:.2f}",
        ]
        cells += [str(r.get("changes", 0)), str(r.get("retries", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def moves_after_first_plan(run_dir, until_step: int | None = None, limit: int = 12) -> str:
    """The operands a run's ``auto`` checks and guard moved after its first plan, with why, from
    its ``metrics.jsonl`` ``moves`` records (``step 25  model.layers.2.mlp.down_proj
    grad_weight.grad_out fp4 -> fp6: underflow``), the latest ``limit``; "" where none moved (or
    the run is older than those records). ``until_step`` as in `plan_over_time`."""
    records = [
        record
        for record in read_records(run_dir, "moves")
        if record["step"] > 1 and (until_step is None or record["step"] <= until_step)
    ]
    moves = [
        f"  step {record['step']}  {key.replace('/', ' ')} {why}"
        for record in records
        for key, why in record.items()
        if key not in ("step", "split")
    ]
    if not moves:
        return ""
    shown = moves[-limit:]
    more = f" (the latest {len(shown)} of {len(moves)})" if len(moves) > limit else ""
    return "\n".join([f"moved after the first plan{more}:", *shown])


def last_plan(run_dir) -> tuple[int, dict[str, dict[str, str]], set] | None:
    """The latest ``auto`` plan of a run, ``(step, {layer: {operand: rung}}, idle)``, from the
    last ``plan`` record of its ``metrics.jsonl`` (the plan at every change; a resume drops the
    records after its checkpoint, so this is the plan the run goes on with); None where it logged
    none (another recipe, or a run stopped before its first check). Read there, not from a
    checkpoint: no checkpoint's weights to load, and a run killed before its first save has one
    too. ``idle``: the ``(layer, operand)`` pairs whose GEMMs did not run at that check (the
    record's ``idle`` list, `AutoPrecision.idle`; empty in a record made before session 42)."""
    records = read_records(run_dir, "plan")
    if not records:
        return None
    record = records[-1]
    plan: dict[str, dict[str, str]] = {}
    idle = {tuple(key.rsplit("/", 1)) for key in record.get("idle", ())}
    for key, rung in record.items():
        if key in ("step", "split", "idle"):
            continue
        if rung not in RUNGS:
            raise UsageError(
                f"{run_dir}/metrics.jsonl: unknown auto rung {rung!r} for {key} at step "
                f"{record['step']} (valid: {', '.join(RUNGS)}); fix: restore the run's file"
            )
        layer, _, operand = key.rpartition("/")
        plan.setdefault(layer, {})[operand] = rung
    return int(record["step"]), plan, idle
