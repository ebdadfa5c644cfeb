"""The compare report's plots (matplotlib, Agg backend, PNG): loss curves and their difference to
the baseline, final gap per recipe with error bars, speed and memory, per-label accuracy change."""

from __future__ import annotations

import math
from pathlib import Path

from lowbit.memory.breakdown import COMPONENTS, LABELS

SMOOTH = 0.1  # fraction of the steps in the moving average of noisy train losses
# Every file `write_plots` may write (a study draws the per-label map only for labelled tasks).
FILES = ("loss_curves.png", "final_gap.png", "speed_memory.png", "per_label.png")


def _smooth(values: list[float]) -> list[float]:
    """Moving average over the finite values of each window; NaN (not drawn) at a non-finite
    value, which would otherwise turn every later point of a running sum into NaN."""
    width = max(1, int(len(values) * SMOOTH))
    finite = [v if math.isfinite(v) else 0.0 for v in values]
    counted = [1 if math.isfinite(v) else 0 for v in values]
    out, total, count = [], 0.0, 0
    for i, v in enumerate(values):
        total, count = total + finite[i], count + counted[i]
        if i >= width:
            total, count = total - finite[i - width], count - counted[i - width]
        out.append(total / count if math.isfinite(v) and count else math.nan)
    return out


def _mark_non_finite(ax, points, color) -> None:
    """An x at the top of the axes for every (step, value) whose value is NaN or inf: matplotlib
    leaves such a point out, and the evaluation would vanish from the plot."""
    steps = [step for step, value in points if not math.isfinite(value)]
    if steps:
        ax.plot(
            steps, [0.97] * len(steps), "x", ms=6, color=color, transform=ax.get_xaxis_transform()
        )


def _figure(*args, **kw):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*args, **kw)


def write_plots(results: dict, folder: Path) -> dict[str, Path]:
    """Write the PNGs into ``folder``; returns {name: path}."""
    folder = Path(folder)
    out = {
        "loss_curves": _loss_curves(results, folder / "loss_curves.png"),
        "final_gap": _final_gap(results, folder / "final_gap.png"),
        "speed_memory": _speed_memory(results, folder / "speed_memory.png"),
    }
    # the heat map has a row per recipe besides the baseline: none in a study of the baseline alone
    if any(r["per_label"] for n, r in results["recipes"].items() if n != results["baseline"]):
        out["per_label"] = _per_label(results, folder / "per_label.png")
    return out


COLORS = 10  # matplotlib's default colour cycle, "C0" to "C9"


def _style(index: int) -> tuple[str, str, str]:
    """The colour, line style and validation marker of the ``index``-th recipe's curves: a colour
    each for the first ten, then the colours again with another line style and marker. By colour
    alone, the 11th recipe of a study drew in the 1st's (the baseline's) colour, and the legend
    could not tell them apart."""
    cycle = index // COLORS % 4
    return f"C{index % COLORS}", ("-", "--", ":", "-.")[cycle], ("o", "s", "^", "D")[cycle]


def _loss_curves(results, path):
    plt, fig, (ax, dx) = _figure(1, 2, figsize=(13, 4.8))
    base = results["recipes"][results["baseline"]]["curves"]
    base_train = dict(base["train"])
    base_val = dict(base["validation"])
    for i, (name, r) in enumerate(results["recipes"].items()):
        color, dashes, marker = _style(i)
        steps = [s for s, _ in r["curves"]["train"]]
        loss = _smooth([v for _, v in r["curves"]["train"]])
        ax.plot(steps, loss, dashes, label=name, lw=1.2, color=color)
        val = r["curves"]["validation"]
        ax.plot([s for s, _ in val], [v for _, v in val], marker, ms=3, color=color)
        _mark_non_finite(ax, val, color)
        common = [s for s in steps if s in base_train]
        diff = _smooth([dict(r["curves"]["train"])[s] - base_train[s] for s in common])
        dx.plot(common, diff, dashes, lw=1.2, color=color, label=name)
        vcommon = [(s, v - base_val[s]) for s, v in val if s in base_val]
        dx.plot([s for s, _ in vcommon], [d for _, d in vcommon], marker, ms=3, color=color)
        _mark_non_finite(dx, vcommon, color)
    ax.set(
        xlabel="step",
        ylabel="loss",
        title="train loss (smoothed, mean over seeds); dots: val; x: non-finite val",
    )
    dx.axhline(0, color="k", lw=0.6)
    dx.set(xlabel="step", ylabel="loss - baseline", title=f"difference to {results['baseline']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _final_gap(results, path):
    rows = results["recipes"]
    names = list(rows)
    plt, fig, ax = _figure(figsize=(max(6, 0.55 * len(names) + 2), 4.2))
    gaps = [rows[n]["val_gap_pct"] for n in names]
    errs = [2 * rows[n]["val_gap_spread_pct"] for n in names]
    colors = [
        "#1a7f37"
        if rows[n]["meets_target"]
        else ("#cf222e" if rows[n]["meets_target"] is False else "#9a6700")
        for n in names
    ]
    x = range(len(names))
    ax.bar(x, [g if math.isfinite(g) else 0 for g in gaps], yerr=errs, color=colors, capsize=3)
    for i, n in enumerate(names):
        if n != results["baseline"]:
            t = rows[n]["target"]["pct"]
            ax.plot([i - 0.4, i + 0.4], [t, t], "k--", lw=0.8)
            if not math.isfinite(gaps[i]):  # its bar is drawn at 0, which reads as no gap
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
    ax.set(
        ylabel="final val loss gap (%)",
        title="gap to baseline, error bars 2x seed spread; dashes: target",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _speed_memory(results, path):
    rows = results["recipes"]
    names = list(rows)
    plt, fig, (sx, mx) = _figure(1, 2, figsize=(max(10, 0.9 * len(names) + 4), 4.2))
    x = list(range(len(names)))
    ratios = [rows[n]["throughput_ratio"] for n in names]
    sx.bar(x, ratios, color="#4c72b0")
    sx.axhline(1, color="k", lw=0.6)
    sx.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    sx.set_xlim(-0.6, len(names) - 0.4)  # every ratio n/a: no bar to size the axis by
    sx.set(ylabel=f"throughput / {results['baseline']}", title="speed (this device)")
    bottom = [0.0] * len(names)
    # up to the peak (the transients are not in records before sessions 41 and 42)
    for c in (*COMPONENTS, "logits_gradient", "backward_workspace"):
        vals = [(rows[n]["bytes_per_param"] or {}).get(c, 0.0) for n in names]
        mx.bar(x, vals, bottom=bottom, label=LABELS[c])
        bottom = [b + v for b, v in zip(bottom, vals)]
    # a recipe (or a baseline) none of whose runs measured one has no bar, which read as no time
    # or no memory: a recipe whose every seed stopped on a non-finite loss
    at_bottom = {"ha": "center", "va": "bottom", "fontsize": 8}
    for i, n in enumerate(names):
        if not math.isfinite(ratios[i]):  # (no bar either to set the axis's range)
            sx.text(i, 0, "n/a", transform=sx.get_xaxis_transform(), **at_bottom)
        if not rows[n]["bytes_per_param"]:
            mx.text(i, 0, "n/a", **at_bottom)
    mx.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    mx.set(ylabel="bytes per parameter", title="training memory by component")
    # beside the axes: inside, where every bar reaches the top (a long recipe list), it covered
    # the first recipes' bars
    mx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _per_label(results, path):
    rows = {n: r for n, r in results["recipes"].items() if n != results["baseline"]}
    labels = sorted({label for r in rows.values() for label in r["per_label"]})
    plt, fig, ax = _figure(figsize=(max(6, 0.6 * len(labels) + 2), 0.4 * len(rows) + 2))
    grid = [
        [rows[n]["per_label"].get(label, {}).get("change_pp", math.nan) for label in labels]
        for n in rows
    ]
    finite = [abs(v) for row in grid for v in row if math.isfinite(v)]
    lim = max([*finite, 1.0])
    # a cell without a change (a recipe whose every seed stopped on a non-finite loss) was left
    # blank, as white as "no change" in this colour map: a recipe that measured nothing read as
    # one that forgot nothing
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#999999")
    image = ax.imshow(grid, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    # a tag's "$" is a dollar sign, not the start of matplotlib's mathtext (a tag "B-$\foo$" raised)
    ticks = [label.replace("$", r"\$") for label in labels]
    ax.set_xticks(range(len(labels)), ticks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            text = f"{v:+.1f}" if math.isfinite(v) else "n/a"
            ax.text(j, i, text, ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="accuracy change (pp)")
    ax.set_title(f"per-label validation accuracy change vs {results['baseline']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
