"""The compare report as Markdown tables (``report.md``); `tables` is shared with the HTML page."""

from __future__ import annotations

import math
from pathlib import Path

from lowbit.memory.breakdown import human
from lowbit.report.compare import Target, spread_digits, tightest_target, verdict_digits
from lowbit.train.config import write_atomically
from lowbit.train.trainer import TRAIN_LOSS_STEPS

SHORT = {
    "parameters": "params",
    "gradients": "grads",
    "master_weights": "master",
    "optimizer_states": "optim",
    "activations": "activ",
    "temporaries": "temp",
    "logits_gradient": "logits grad",  # the loss backward's transient, in the CPU's peak
    "backward_workspace": "bwd workspace",  # the layers' backward's, in the CPU's peak (s42)
    "model_states": "model states",
}
WORST_LABELS = 3  # per recipe in the "what the model forgets" table
# What the train loss column holds: the run's record (`lowbit train`'s summary line), a mean over
# its last steps, which in a short study includes the first, untrained ones; read as the last
# step's loss it did not match metrics.jsonl (a 16-step run: 4.87 in the table, 4.05 there).
TRAIN_LOSS = (
    f"train loss = a run's mean over its last {TRAIN_LOSS_STEPS} training steps, or all of a "
    "shorter run's, as lowbit train prints it, not its last step's"
)
# Evaluations in the gap-by-evaluation table at most: a 5000-step run evaluated every 100 steps
# made a table 51 columns wide, which no page shows (results.json holds every evaluation).
GAP_COLUMNS = 12


def _pm(pair, digits=4, seeds=2) -> str:
    """Mean ± std over seeds; the value alone from one seed (whose spread is undefined)."""
    mean, std = pair
    if not math.isfinite(mean):
        return "n/a"
    # a diverging run's perplexity, exp(590), printed 257 digits in fixed point
    form = f".{digits}f" if abs(mean) < 1e6 else ".3e"
    return f"{mean:{form}}" + (f" ± {std:{form}}" if seeds > 1 else "")


def _count(pair) -> str:
    """A per-seed count's mean ± std: the count itself when every seed agrees or there is one
    (whose std is NaN: not measured), else two decimals."""
    mean, std = pair
    return f"{mean:g}" if not std or not math.isfinite(std) else f"{mean:.2f} ± {std:.2f}"


def _pct(value, spread=None, digits=3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}%" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _val_gap(r: dict, seeds: int) -> str:
    """The validation gap ± its seed spread, to as many decimals as the verdict prints (3 to 6,
    `verdict_digits`): at 3 always, a gap a hair above its target read "+0.500%" beside "≤ 0.5%"
    and ❌."""
    gap, spread = r["val_gap_pct"], r["val_gap_spread_pct"] if seeds > 1 else None
    if gap is None or not math.isfinite(gap):
        return "n/a"
    digits = verdict_digits(gap, 2 * (spread or 0.0), r["target"]["pct"], seeds)
    return _pct(gap, spread, digits)


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of the report."""
    rows = results["recipes"]
    base = results["baseline"]
    metric = results["metric"]
    loss_rows = []
    for name, r in rows.items():
        m = r["metrics"].get(metric, (math.nan, math.nan))
        target = r["target"]
        seeds = len(r["seeds"])
        # both gaps are paired over seeds, so both carry the spread of their differences
        # (the validation gap's in `_val_gap`)
        train_spread = r["train_gap_spread_pct"] if seeds > 1 else None
        loss_rows.append(
            [
                name + (" (baseline)" if name == base else ""),
                _pm(r["train_loss"], seeds=seeds),
                _pm(r["val_loss"], seeds=seeds),
                # the baseline has no gap to itself: a "+0.000%" read as a measured one
                "—"
                if name == base
                else _pct(r["train_gap_pct"], train_spread, spread_digits(train_spread or 0.0)),
                "—" if name == base else _val_gap(r, seeds),
                _pm(m, 4 if metric != "ppl" else 2, seeds),
                _count(r["skipped_steps"]),
                "—"
                if name == base
                else ("worse than " if target["expect_worse"] else "≤ ") + f"{target['pct']:g}%",
                "✅" if r["meets_target"] else ("❌" if r["meets_target"] is False else "❔"),
            ]
        )
    speed_rows = []
    for name, r in rows.items():
        per = r["bytes_per_param"]
        peak = r["peak_memory_bytes"]
        speed_rows.append(
            [
                name,
                # NaN: no run of the recipe (or of the baseline) trained a step to time
                f"{r['throughput']:,.0f} {r['unit']}/s"
                if math.isfinite(r["throughput"])
                else "n/a",
                f"{r['throughput_ratio']:.2f}x" if math.isfinite(r["throughput_ratio"]) else "n/a",
                human(peak) if peak is not None and math.isfinite(peak) else "n/a",
                # records written before session 41 have no logits gradient, before 42 no workspace
                *(f"{per[c]:.2f}" if per and c in per else "n/a" for c in SHORT),
            ]
        )
    one_seed = all(len(r["seeds"]) == 1 for r in rows.values())
    load = "; ".join(note for note in (speed_load_note(results), _emulated_note(rows)) if note)
    load = f"; {load}" if load else ""
    out = [
        (
            (
                "Loss and task metric (one seed: no spread, so no difference is called "
                "significant; gaps = differences to the baseline's final train and validation "
                f"losses; {TRAIN_LOSS})"
                if one_seed
                else "Loss and task metric (mean ± std over seeds; gaps = paired differences to "
                "the baseline's final train and validation losses, ± their seed spread; "
                f"{TRAIN_LOSS})"
            ),
            [
                "recipe",
                "train loss",
                "val loss",
                "train gap",
                "val gap",
                metric,
                "skipped steps",
                "target",
                "meets",
            ],
            loss_rows,
        ),
        *([gap_by_evaluation(results)] if len(rows) > 1 else []),  # no rows without a recipe
        (
            f"Speed and memory ({_measured_on(results)}peak memory: {_memory_kind(rows)}; "
            f"bytes per parameter by component, measured on the live run{load})",
            ["recipe", "throughput", "vs baseline", "peak memory", *SHORT.values()],
            speed_rows,
        ),
    ]
    label_rows, counted, dropped, missing = [], False, False, False
    for name, r in rows.items():
        if name == base:
            continue
        if r.get("per_label_missing"):  # no seed both runs finished: none counted per label
            label_rows.append([name, "every label", "—", "n/a", f"n/a ({r['per_label_missing']})"])
            missing = True
            continue
        if not r["per_label"]:
            continue
        worst = sorted(
            ((label, c) for label, c in r["per_label"].items() if _dropped(c["change_pp"])),
            key=lambda kv: kv[1]["change_pp"],
        )[:WORST_LABELS]
        counted, dropped = True, dropped or bool(worst)
        if not worst:
            label_rows.append([name, "no label dropped", "—", "—", "—"])
        for label, c in worst:
            label_rows.append(
                [
                    name,
                    label,
                    f"{100 * c['baseline']:.1f}%",
                    f"{100 * c['recipe']:.1f}%",
                    f"{c['change_pp']:+.1f} pp",
                ]
            )
    if label_rows:
        # where no recipe drops a label, "the 3 labels whose accuracy drops most" named none; a
        # recipe that drops fewer shows fewer rows (`_dropped`: a drop printed as -0.1 pp or more)
        what = (
            f"per recipe, up to {WORST_LABELS} labels whose validation accuracy drops most "
            "against the baseline (by 0.05 pp or more), labels that held or rose left out"
            if dropped or not counted
            else "no label's validation accuracy drops against the baseline"
            + (" where it was counted" if missing else "")
        )
        # an image classifier's loss is over the whole split too (--eval-batches is ignored)
        split = (
            "as the loss table's"
            if results["task"] == "image-classification"
            else "not only the --eval-batches of the loss table, so that rare labels count"
        )
        out.append(
            (
                f"What the model forgets: {what} (over the whole validation split, {split}; "
                "pooled over the seeds both runs finished)",
                ["recipe", "label", "baseline acc", "recipe acc", "change"],
                label_rows,
            )
        )
    return out


def _dropped(change_pp: float) -> bool:
    """Whether a label's accuracy change is a drop as the table prints it (one decimal): a tiny
    drop rounds to "-0.0 pp", which reads as no change in a table of what the model forgets."""
    return math.isfinite(change_pp) and round(change_pp, 1) < 0


def gap_by_evaluation(results: dict) -> tuple[str, list[str], list[list[str]]]:
    """The validation gap to the baseline at every evaluation after the start.

    The gap of the mean curves, ``(mean(recipe) - mean(baseline)) / mean(baseline)`` at each
    step, equals the mean paired gap there (a mean of differences is the difference of means),
    so the last column is the loss table's gap. Read along a row: a gap that shrinks as training
    goes on is a recipe that converges later than the baseline; one that holds or grows is a cost
    in the loss it ends at.
    """
    base = results["baseline"]
    base_curve = {step: loss for step, loss in results["recipes"][base]["curves"]["validation"]}
    steps = [step for step in base_curve if step > 0]
    if not steps:  # a table of recipe names under no column would not say why
        why = (
            f"seed {results['recipes'][base]['diverged'][0]} diverged: non-finite loss"
            if results["recipes"][base]["diverged"]
            else "it did not evaluate"
        )
        return (
            f"Validation gap by evaluation: none, the baseline {base} has no validation loss "
            f"after the start ({why})",
            [],
            [],
        )
    shown = ""
    if len(steps) > GAP_COLUMNS:  # evenly spaced, the first and the last (the loss table's) kept
        shown = (
            f"; {GAP_COLUMNS} of the {len(steps)} evaluations, evenly spaced (results.json holds "
            "every one)"
        )
        last = len(steps) - 1
        steps = [steps[round(i * last / (GAP_COLUMNS - 1))] for i in range(GAP_COLUMNS)]
    table_rows = []
    for name, r in results["recipes"].items():
        if name == base:
            continue
        curve = dict(r["curves"]["validation"])
        table_rows.append([name] + [_step_gap(curve, base_curve, step) for step in steps])
    return (
        "Validation gap by evaluation (gap to the baseline's mean validation loss at each "
        "evaluation: a gap that shrinks along a row is a recipe converging later, one that holds "
        f"or grows a cost in final loss{shown})",
        ["recipe", *(f"step {step}" for step in steps)],
        table_rows,
    )


def _step_gap(curve: dict, base_curve: dict, step: int) -> str:
    """One cell of the gap by evaluation: "—" where the recipe did not evaluate at ``step``,
    "non-finite" where its or the baseline's mean validation loss was NaN or inf there (a seed's,
    named by `non_finite_line`), "n/a" where the baseline's was 0 (no percent of it), else the
    gap."""
    if step not in curve:
        return "—"
    if not (math.isfinite(curve[step]) and math.isfinite(base_curve[step])):
        return "non-finite"
    if base_curve[step] == 0:
        return "n/a"
    return _pct(100 * (curve[step] - base_curve[step]) / base_curve[step])


def non_finite_line(results: dict) -> str:
    """One sentence naming every seed whose validation loss was NaN or inf at some evaluation
    and where (`lowbit.report.compare._non_finite_evaluations`): their recipe's mean curve has no
    value there, and a plot alone would show a missing point."""
    runs = [
        f"{name} seed {seed} at step{'s' if len(steps) > 1 else ''} " + ", ".join(map(str, steps))
        for name, r in results["recipes"].items()
        # absent in results from before session 25
        for seed, steps in (r.get("non_finite_evaluations") or {}).items()
    ]
    if not runs:
        return ""
    return (
        'Non-finite validation loss ("non-finite" in the gap by evaluation, x at the top of '
        f"the loss plots): {'; '.join(runs)}."
    )


def speed_load_note(results: dict) -> str:
    """What the throughput column can be trusted for, given the ``--jobs`` the runs trained
    under and the threads they trained on (`lowbit.report.compare.speed_load`, `speed_threads`);
    empty when they trained one at a time on one thread count."""
    return "; ".join(part for part in (_jobs_note(results), _threads_note(results)) if part)


def _jobs_note(results: dict) -> str:
    loads = results.get("speed_load") or []  # absent in results from before session 19
    if len(loads) > 1:
        return _mixed_speeds(
            "under different loads", "--jobs", loads, "load", "--jobs 1 for speed alone"
        )
    if loads and loads[0] > 1:
        return (
            f"the runs trained up to {loads[0]} at a time (--jobs {loads[0]}), sharing the "
            "cores: throughput is per run under that load, slower than alone, and ratios are "
            "rough (--jobs 1 for speed)"
        )
    return ""


def _threads_note(results: dict) -> str:
    threads = results.get("speed_threads") or []  # absent in results from before session 25
    if len(threads) > 1:
        return _mixed_speeds(
            "on different thread counts", "--threads", threads, "threads", "--overwrite"
        )
    return ""


def _mixed_speeds(how: str, flag: str, values: list[int], what: str, fix: str) -> str:
    """The warning of a study whose runs were timed with different ``flag`` values."""
    return (
        f"WARNING: the runs trained {how} ({flag} {', '.join(map(str, values))}), so the "
        f"throughput ratios mix the {what} with the recipe: for speed, train again with one "
        f"{flag} for all ({fix})"
    )


def _emulated_note(rows: dict) -> str:
    """The recipes whose low-precision layers the CPU emulated (`layers.cpu_emulated`; records
    from before session 38 do not say): their throughput is that of the emulation, so fp8 read
    as 0.3x fp32's where a GPU with fp8 kernels runs it faster."""
    emulated = [name for name, r in rows.items() if (r.get("layers") or {}).get("cpu_emulated")]
    if not emulated:
        return ""
    return (
        f"{', '.join(emulated)} ran in bit-faithful emulation on the CPU (no kernels for "
        f"{'its' if len(emulated) == 1 else 'their'} formats): throughput measures the "
        "emulation, not the formats' speed on hardware that has them"
    )


def _measured_on(results: dict) -> str:
    """Where the speed table was measured, "measured on cpu, 1 thread; " (empty for results
    from before session 27, which do not say): a throughput read beside another study's means
    nothing without it. Mixed thread counts are `_threads_note`'s warning."""
    devices = results.get("speed_devices") or []
    if not devices:
        return ""
    threads = results.get("speed_threads") or []
    count = (
        f", {threads[0]} thread{'s' if threads[0] != 1 else ''}"
        if len(threads) == 1 and devices == ["cpu"]
        else ""
    )
    return f"measured on {' and '.join(devices)}{count}; "


def _memory_kind(rows) -> str:
    return next((r["peak_memory_kind"] for r in rows.values() if r["peak_memory_kind"]), "n/a")


def md_table(header, rows) -> str:
    """A Markdown table; a ``|`` in a cell (a tag such as ``B-ORG|LOC``) is escaped, else it
    would split the cell and shift the row's later columns, and so is a ``<`` (a tag such as
    ``<PER>``), which a Markdown renderer takes for the start of an HTML tag and drops."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("<", "\\<")

    def line(cells) -> str:
        return "| " + " | ".join(map(cell, cells)) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def describe(results: dict) -> str:
    """One paragraph: what was trained."""
    s = results["settings"]
    b = s["base"]
    steps = f"{b['steps']} steps" if b.get("steps") else run_length_in_epochs(b["epochs"])
    shape = f"batch {b['batch_size']}" + (f" x seq {b['seq_len']}" if b.get("seq_len") else "")
    text = (
        f"Task {results['task']}, model {b['model']}, {steps}, {shape}, lr {b['lr']:g}, "
        f"seeds {', '.join(map(str, s['seeds']))}; baseline {results['baseline']}. Same "
        "initialization and data order per seed for every recipe."
    )
    if b.get("overrides"):
        text += f" Layer overrides on every recipe: {', '.join(b['overrides'])}."
    scaling = [
        f"{label} {b[key]:g}"
        for key, label in (
            ("loss_scale", "start"),
            ("loss_scale_growth_interval", "growth interval"),
        )
        if b.get(key) is not None
    ]
    if scaling:
        text += f" Loss scaling of the fp16 recipes: {', '.join(scaling)}."
    return " ".join(part for part in (text, trend_line(results), non_finite_line(results)) if part)


def run_length_in_epochs(epochs: float) -> str:
    """``--epochs`` as the user gave it: "1 epoch", "1.5 epochs" (the setting is a float, which
    printed as it is read "1.0 epochs")."""
    return f"{epochs:g} epoch" + ("" if epochs == 1 else "s")


def trend_line(results: dict) -> str:
    """One sentence: is the baseline's validation loss flat at the end, against the tightest
    target of the study (`lowbit.report.compare.baseline_trend`)."""
    trend = results.get("baseline_trend")  # absent in results from before session 14
    if not trend:
        return ""
    change = trend["change_pct"]
    # a one-seed study's loss is its one run's: "mean over seeds" said there were several
    seeds = results.get("settings", {}).get("seeds") or []
    over = f"seed {seeds[0]}" if len(seeds) == 1 else "mean over seeds"
    text = (
        f"The baseline's validation loss moved {change:+.2f}% over the last "
        f"{trend['to_step'] - trend['from_step']} steps ({trend['from_loss']:.4f} -> "
        f"{trend['to_loss']:.4f}, {over})"
    )
    pct = tightest_target(
        Target(r["target"]["pct"], expect_worse=r["target"]["expect_worse"])
        for name, r in results["recipes"].items()
        if name != results["baseline"]
    )
    if pct is not None and -change > pct:
        return (
            f"{text}: still falling by more than the tightest target ({pct:g}%), so a "
            "gap partly measures how fast a recipe converges, not only where it ends."
        )
    return text + "."


def verdicts(results: dict) -> list[tuple[str | None, str]]:
    """(recipe, verdict line) per recipe besides the baseline, and the baseline's where it failed
    (it diverged: nothing is judged against it); with none, one line that says so (recipe None):
    a study of the baseline alone measures its seed spread, speed and memory."""
    items = [
        (name, f"{name}: {r['verdict']}{_no_layer_note(r.get('layers'))}")
        for name, r in results["recipes"].items()
        if name != results["baseline"] or r.get("meets_target") is False
    ]
    return items or [
        (
            None,
            f"only the baseline ({results['baseline']}) ran: no recipe to judge against it; "
            "add recipes to --recipes",
        )
    ]


def targets_line(results: dict) -> str:
    """Where each judged recipe's target comes from (its allowed validation loss gap): a parity
    target's paper (against an fp32 baseline, docs/parity.md), --target or --tolerance. The
    verdicts said "within 3%" and the table "≤ 3%" with nowhere a word on why 3%."""
    parts, papers = [], False
    for name, r in results["recipes"].items():
        if name == results["baseline"]:
            continue
        target, source = r["target"], r["target"]["source"]
        bound = "worse than " if target["expect_worse"] else "≤ "
        if source and not source.startswith("--"):
            source, papers = f"parity target: {source}", True
        parts.append(f"{name} {bound}{target['pct']:g}%" + (f" ({source})" if source else ""))
    if not parts:
        return ""
    where = " Parity targets apply against an fp32 baseline: docs/parity.md." if papers else ""
    return f"Targets (the validation loss gap to the baseline allowed): {'; '.join(parts)}.{where}"


def verdict_lines(results: dict) -> list[str]:
    return [line for _, line in verdicts(results)]


def _no_layer_note(layers: dict | None) -> str:
    """A warning for a recipe that converts layers but kept every one of this model's (nvfp4 keeps
    the first and last block: all of a 2-block model): its row is not that recipe's formats."""
    if not layers or not layers.get("kept_every_layer"):  # (`Precision.keeps_every_layer`)
        return ""
    return (
        f" (note: none of the model's {layers['total']} GEMM layers is in the recipe's own "
        "formats, the recipe keeps them all in high precision: this row measures its other ops)"
    )


def write_markdown(results: dict, path: Path) -> Path:
    parts = ["# lowbit compare", "", describe(results), "", "## Verdicts", ""]
    parts += [f"- {line}" for line in verdict_lines(results)]
    if targets := targets_line(results):
        parts += ["", targets]
    for title, header, rows in tables(results):
        parts += ["", f"## {title.split(' (')[0].split(':')[0]}", "", title + "."]
        if header:  # a table without one is its title alone (`gap_by_evaluation`)
            parts += ["", md_table(header, rows)]
    images = results.get("images", {})
    if images:
        parts += ["", "## Plots", ""]
        parts += [f"![{key}]({name})" for key, name in images.items()]
    return write_atomically(path, "\n".join(parts) + "\n")  # parallel parts of a study
