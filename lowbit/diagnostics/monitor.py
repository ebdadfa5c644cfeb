"""What the training loop calls for diagnostics: statistics at an interval, `auto`, the guard.

    monitor = build_monitor(model, recipe, stats_interval)
    monitor.before_step(step)                       # attach observers on observed steps
    ... forward / backward ...
    if monitor.retry(step, loss, parameters, attempt): drop the gradients, run the batches again
    records = monitor.after_step(step, grad_norm, loss_scale)   # [(split, record)] to log
    records = monitor.stopped_records()   # instead, where the step stopped the run (non-finite)

`build_monitor` returns `NoMonitor` (every hook a no-op) when statistics are off and the recipe
is not ``auto``, so a run without diagnostics pays nothing.
"""

from __future__ import annotations

from lowbit.diagnostics.auto import all_finite, controller_for
from lowbit.diagnostics.stats import StatsCollector, flatten


class NoMonitor:
    enabled = False
    controller = None

    def before_step(self, step: int) -> None:
        pass

    def retry(self, step: int, loss: float, parameters, attempt: int) -> bool:
        return False

    def after_step(self, step: int, grad_norm: float, loss_scale: float) -> list:
        return []

    def stopped_records(self) -> list:
        return []

    def unfinished_stats(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TrainingMonitor(NoMonitor):
    enabled = True

    def __init__(self, model, recipe, stats_interval: int = 0, **auto_options):
        self.stats_interval = stats_interval
        self.controller = controller_for(model, recipe, **auto_options)
        self.collector = (
            self.controller.collector if self.controller is not None else StatsCollector(model)
        )
        self._observed = None  # "stats", "check" or None for the step in flight
        self._retries = 0  # the step's attempts the guard rolled back and ran again
        self._moves: list = []  # the guard's moves in the step, the attempt it gave up on's too
        self._given_up: dict = {}  # the statistics of the attempt the guard gave up on
        self._logged_idle: set = set()  # the controller's `idle` as the last plan record gives it

    def before_step(self, step: int) -> None:
        check = self.controller is not None and self.controller.wants_check(step)
        stats = self.stats_interval > 0 and step % self.stats_interval == 0
        self._observed = "check" if check else ("stats" if stats else None)
        self._retries, self._moves = 0, []
        self._given_up = {}
        if check:
            self.controller.begin()
        elif stats:
            self.collector.attach()

    def retry(self, step: int, loss: float, parameters, attempt: int) -> bool:
        """Whether to roll the step back and run it again (``auto`` only: the guard)."""
        if self.controller is None:
            return False
        if all_finite(loss, parameters):
            return False
        observed = self.collector.collect() if self._observed else {}
        retried = attempt < self.controller.max_retries
        if attempt > 0 or observed:  # the retried attempt ran observed: move its offenders up
            # also where the guard gives up: the moves hold for the steps after it, if any
            self._moves += self.controller.escalate(observed, step, retried=retried)
        if not retried:
            self._observed = None
            self._given_up = observed
            return False
        self._retries += 1
        # the next attempt runs observed, so its offenders can be named if it fails again; a
        # check step stays one, decided from the attempt that succeeds (as "stats" the check was
        # dropped: the first plan waited a step, a periodic one a whole interval)
        if self._observed == "check":
            self.controller.begin()
        else:
            self._observed = "stats"
            self.collector.attach()
        return True

    def after_step(self, step: int, grad_norm: float, loss_scale: float) -> list:
        records = []
        kind, self._observed = self._observed, None
        first = kind == "check" and not self.controller.checked  # the first plan
        if kind == "check":
            stats, changes = self.controller.finish_check(step)
        elif kind == "stats":
            stats, changes = self.collector.collect(), []
        else:
            stats, changes = {}, []
        if stats and self.stats_interval > 0 and step % self.stats_interval == 0:
            record = flatten(stats)
            record.update(grad_norm=grad_norm, loss_scale=loss_scale)
            records.append(("stats", record))
        if self.controller is None:
            return records
        moved = changes or self._moves or self._retries or step == 1
        if moved:
            summary = self.controller.summary()
            # the guard's moves count too: a retried step's counts per rung moved by them
            summary["changes"] = len(changes) + len(self._moves)
            summary["retries"] = self._retries
            records.append(("auto", summary))
        # and where a check found other GEMMs idle (a mixture of experts' routing): the plan
        # record's `idle` is what `lowbit estimate RUN` counts the plan without, as the run's
        # summary does at its end (session 42 wrote it only as the plan moved: a 26-step run of
        # 16 experts said "24 fp8, 60 bf16 of 84 operands", its estimate "48 fp8 of 48")
        if moved or self.controller.idle != self._logged_idle:
            self._logged_idle = set(self.controller.idle)
            plan = {
                f"{layer}/{op}": rung
                for layer, ops in self.controller.plan.items()
                for op, rung in ops.items()
            }
            idle = self.controller.idle  # kept by the plan, left out of its counts
            if idle:  # for `at_plan`, which counts as the summary does (`lowbit estimate RUN`)
                plan["idle"] = sorted(f"{layer}/{op}" for layer, op in idle)
            records.append(("plan", plan))
            # the guard's moves first: a check after them decides last
            why = self._why([*self._moves, *changes])
            if first:  # and what the first plan holds where it is, whatever a check measures
                why.update(self.controller.held())
            if why:
                records.append(("moves", why))
        return records

    def stopped_records(self) -> list:
        """The records of a step the trainer stopped at (non-finite after the guard gave up,
        `lowbit.train.trainer.NonFiniteLoss`): what the guard moved in its attempts and why
        (``moves``), which named the operands it blamed; not the plan they made, which no step
        trained with."""
        why = self._why(self._moves)
        return [("moves", why)] if why else []

    @staticmethod
    def _why(moved: list) -> dict:
        """The ``moves`` record of ``moved`` (`AutoPrecision._decide`'s and the guard's
        `escalate`'s changes): ``LAYER/OPERAND``: ``fp4 -> fp6: underflow``; the last move of an
        operand decides."""
        return {
            f"{c['layer']}/{c['operand']}": f"{c['from']} -> {c['to']}: {c['why']}" for c in moved
        }

    def unfinished_stats(self) -> dict:
        """The statistics of a step that stopped before its optimizer step (non-finite): what the
        observer holds, or, under ``auto``, what the guard read from the attempt it gave up on
        (`lowbit doctor` diagnoses a probe that stopped from them)."""
        return self.collector.collect() or self._given_up

    def state_dict(self) -> dict:
        return {"auto": self.controller.state_dict()} if self.controller is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.controller is not None and "auto" in state:
            self.controller.load_state_dict(state["auto"])
            self._logged_idle = set(self.controller.idle)  # as of the checkpoint's records


def build_monitor(model, recipe, stats_interval: int = 0, **auto_options) -> NoMonitor:
    from lowbit.recipes.auto import budget_of

    if not stats_interval and budget_of(recipe) is None:
        return NoMonitor()
    return TrainingMonitor(model, recipe, stats_interval, **auto_options)
