"""`Breakdown`: training memory by component, in bytes."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field, fields

# Components in the order they are printed. ``temporaries`` are the low-precision copies of
# weights (and, in fp8 recipes, of operands) that the forward saves for the backward, and FSDP's
# gathered layer parameters.
COMPONENTS = (
    "parameters",
    "gradients",
    "master_weights",
    "optimizer_states",
    "activations",
    "temporaries",
)

LABELS = {
    "parameters": "parameters",
    "gradients": "gradients",
    "master_weights": "master weights / Kahan",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "temporaries": "temporary copies",
    "logits_gradient": "logits gradient",  # no component: the loss backward's transient
    "backward_workspace": "backward workspace",  # nor this: the layers' backward's, measured
}
NOTE_WIDTH = 88  # columns of the lines under `Breakdown.table` (a two-column table's 85, about)


def human(n: float) -> str:
    """Bytes in binary units: ``1536 -> '1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class Breakdown:
    """Bytes per component (per device when sharded); ``num_params`` is the model's parameter
    count (unsharded), used by `per_param`.

    ``bucket_rebuild`` is a DDP rank's second copy of its gradients while DistributedDataParallel
    rebuilds its all-reduce buckets, once, before the second step's forward (new buckets made
    before the old are freed): it never coexists with the activations and temporaries, so the
    peak, `total`, is the model states plus the larger of the two (`peak_set_by`).

    ``logits_gradient`` is the loss's backward transient: at its start, every activation still
    live, cross-entropy's backward holds the gradient of the fp32 logits twice (the loss's, then
    the log-softmax's), ``2 x batch x seq x vocab x 4`` bytes, freed before the first layer's
    backward (`lowbit.memory.estimate`).

    ``backward_workspace`` is what the step's peak holds beyond the other rows: a layer's
    backward makes its operands' quantized and cast copies (on a CPU, in bf16 or fp32 carriers
    for the emulated GEMMs), a convolution reads its unfolded rows again and makes their fp32
    gradient, while only the activations of the layers after it are freed; and the forward
    leaves some tensors alive that no backward saved (the last shared quantization of an input,
    `lowbit.nn.operand.SharedQuantization`). Measured on a live run
    (`lowbit.memory.measure_activations` with ``backward=True``); the estimate leaves it at 0
    (not modelled): the digits CNN's converted convolutions held 7.5 MB beyond a 1.0 MB table
    (docs/memory.md)."""

    parameters: int = 0
    gradients: int = 0
    master_weights: int = 0
    optimizer_states: int = 0
    activations: int = 0
    temporaries: int = 0
    bucket_rebuild: int = 0
    logits_gradient: int = 0
    backward_workspace: int = 0
    num_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def model_states(self) -> int:
        """Parameters, gradients, master weights and optimizer states (ZeRO's "model states")."""
        return self.parameters + self.gradients + self.master_weights + self.optimizer_states

    @property
    def step_peak(self) -> int:
        """What a step's forward and backward add to the model states at the backward's peak:
        activations + temporaries + the logits' gradient + the backward workspace. With the
        model states, the step's peak where the gradients are live then too (DDP's; a later
        micro-batch's), else an upper bound of it (`_total_note`)."""
        return self.activations + self.temporaries + self.logits_gradient + self.backward_workspace

    @property
    def total(self) -> int:
        """The peak, or an upper bound of it (`_total_note`): model states + max(bucket rebuild,
        `step_peak`)."""
        return self.model_states + max(self.bucket_rebuild, self.step_peak)

    @property
    def peak_set_by(self) -> str:
        """Which term sets `total`: ``"bucket rebuild"`` or ``"activations"`` (with the
        temporaries and the logits' gradient, `step_peak`; also where there is no rebuild, and on a
        tie)."""
        if self.bucket_rebuild > self.step_peak:
            return "bucket rebuild"
        return "activations"

    def per_param(self) -> dict[str, float]:
        """Bytes per model parameter of each component, the logits' gradient (and
        ``model_states``, ``total``)."""
        n = max(self.num_params, 1)
        transients = ("logits_gradient", "backward_workspace")
        out = {name: getattr(self, name) / n for name in (*COMPONENTS, *transients)}
        out["model_states"] = self.model_states / n
        out["total"] = self.total / n
        return out

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["total"] = self.total
        return out

    def table(
        self,
        other: Breakdown | None = None,
        titles=("estimate", "measured"),
        checkpointed: bool = False,
        grad_accum: int | None = None,
    ) -> str:
        """A printable table; with ``other``, two columns side by side (e.g. estimate, measured),
        and lines that say what the total adds (`_total_note`: ``checkpointed``, a run with
        activation checkpointing; ``grad_accum``, the run's micro-batches per step, None where
        not known, as in `lowbit estimate`)."""
        rows = [
            (LABELS[name], getattr(self, name), getattr(other, name, None)) for name in COMPONENTS
        ]
        if self.logits_gradient:  # `total` counts it with the activations
            # blank, not 0, where the other column has none (a loss on no layer's output)
            theirs = getattr(other, "logits_gradient", None) or None
            rows.append((LABELS["logits_gradient"], self.logits_gradient, theirs))
        theirs = getattr(other, "backward_workspace", 0)
        if self.backward_workspace or theirs:  # measured only: the estimate's is 0
            mine = self.backward_workspace
            rows.append((LABELS["backward_workspace"], mine, theirs if other is not None else None))
        if self.bucket_rebuild:  # a DDP estimate's; `total` counts it or the activations
            rows.append(
                ("DDP bucket rebuild", self.bucket_rebuild, getattr(other, "bucket_rebuild", None))
            )
        rows.append(("total", self.total, other.total if other is not None else None))
        n = max(self.num_params, 1)
        # as wide as the largest figure and two spaces (a 70B model's batch of 64 x 4096 holds
        # terabytes, whose 17 digits ran into the next column)
        width = max(
            14,
            2 + max((len(f"{value:,}") for row in rows for value in row[1:] if value), default=0),
        )
        per = max(9, 2 + max(len(f"{row[1] / n:.2f}") for row in rows))
        head = f"{'component':<24}{titles[0]:>{width}}{'':>12}{'B/param':>{per}}"
        if other is not None:
            head += f"{titles[1]:>{width}}{'':>12}"
        lines = [head, "-" * len(head)]
        for label, mine, theirs in rows:
            line = f"{label:<24}{mine:>{width},}{human(mine):>12}{mine / n:>{per}.2f}"
            if other is not None and theirs is not None:
                line += f"{theirs:>{width},}{human(theirs):>12}"
            lines.append(line)
        # wrapped as wide as the table's rows usually are (a line of 230-300 characters before)
        said = [self._total_note(checkpointed, grad_accum)]
        if other is not None and other.backward_workspace and not self.backward_workspace:
            said.append(
                f"(backward workspace: measured only, what the step's peak holds beyond the "
                f"rows above it; the {titles[0]} does not model it, and its total is short of "
                "the measured peak by it)"
            )
        note = [
            line for text in said for line in textwrap.wrap(text, NOTE_WIDTH, subsequent_indent=" ")
        ]
        return "\n".join([*lines, *note])

    def _total_note(self, checkpointed: bool, grad_accum: int | None) -> str:
        """What the total adds (`total`), in words, where it is the step's peak and where only
        an upper bound of it: the rows are all live at the start of the backward (where the
        logits gradient, the loss backward's transient, is made and freed) only where the
        gradients are held then, a DDP run's (bucket views, zeroed, not dropped) or a later
        micro-batch's of ``grad_accum`` (a one-process or FSDP run sets them to None after each
        step, so with one micro-batch they are made during the backward as the activations are
        freed); with ``checkpointed``, the block the backward recomputes is live only after the
        logits gradient is freed."""
        recompute = (
            "with activation checkpointing the recomputed block is live only after the logits "
            "gradient is freed"
        )
        if self.bucket_rebuild:
            bound = f"; the latter an upper bound: {recompute}" if checkpointed else ""
            return (
                "(total: model states + the larger of the DDP bucket rebuild and activations + "
                f"temporary copies + logits gradient, never live at once{bound})"
            )
        transient = (
            "; the logits gradient, the loss backward's transient, is freed before the layers' "
            "backward"
            if self.logits_gradient
            else ""
        )
        if self.backward_workspace:
            transient += (
                "; the backward workspace is what the step's peak holds beyond the rows above "
                "it: the layers' backward copies of their operands (emulated GEMMs, a "
                "convolution's unfolded rows), and what the forward leaves alive unsaved"
            )
        made = "made during the backward as activations are freed"
        if grad_accum is None and not checkpointed:  # `lowbit estimate`: the run's is not known
            return (
                "(total: the rows above added: the step's peak of a run with --grad-accum 2 or "
                "more, every row live at the start of a later micro-batch's backward; with 1 an "
                f"upper bound, the gradients (set to None after each step) {made}{transient})"
            )
        reasons = [recompute] if checkpointed else []
        if grad_accum is None or grad_accum == 1:
            accum = "with --grad-accum 1" if grad_accum is None else "at --grad-accum 1"
            reasons.insert(0, f"{accum} the gradients, set to None after each step, are {made}")
        if reasons:
            return (
                "(total: the rows above added, an upper bound of the step's peak: "
                f"{'; '.join(reasons)}{transient})"
            )
        return (
            "(total: the rows above, all live at the start of a later micro-batch's backward, "
            f"the step's peak{transient})"
        )
