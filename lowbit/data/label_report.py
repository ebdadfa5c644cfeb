"""The per-label precision/recall/F1 table that ``lowbit eval`` prints for a classification task
(image classes, token tags), in scikit-learn's `classification_report` layout.

It is written here rather than printed by scikit-learn for two reasons a user met on a subset
(``lowbit eval RUN --max-batches 1``): scikit-learn 1.9 printed every support as a float
(``1.0 ... accuracy 8.0``) when no prediction was right (its counts start as float zeros then),
and it printed no row at all for a class neither present nor predicted, so "which class is hurt"
found no line for it. Every class of the task gets a row here; the averages stay over the labels
present or predicted, the numbers scikit-learn gave before (a class the subset never touched has
no score to average).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

HEADERS = ("precision", "recall", "f1-score", "support")
UNSCORED = "-"  # the cell of a class neither present nor predicted: nothing to divide by
UNSCORED_NOTE = f"({UNSCORED}: neither present nor predicted in the data evaluated; not averaged)"


def label_report(
    true: Sequence[Hashable],
    pred: Sequence[Hashable],
    labels: Sequence[Hashable],
    digits: int = 4,
) -> tuple[str, dict]:
    """``(text, dict)`` of per-label precision, recall, F1 and support, a row for each of
    ``labels`` (every class of the task, in the order to print) and for any other label found.

    The dict is keyed by ``str(label)`` as scikit-learn's ``output_dict`` is, supports as ints;
    a label neither true nor predicted has support 0 and ``None`` for its scores. Undefined
    divisions of a label that was predicted or present count as 0 (``zero_division=0``).
    """
    from sklearn.metrics import classification_report

    present = set(true) | set(pred)
    ordered = [*labels, *sorted(present - set(labels), key=str)]
    scored = [label for label in ordered if label in present]
    found = (
        classification_report(true, pred, labels=scored, zero_division=0, output_dict=True)
        if scored
        else {}
    )
    report = {}
    for label in ordered:
        row = found.get(str(label))
        report[str(label)] = (
            {**row, "support": int(row["support"])}
            if row is not None
            else dict.fromkeys(HEADERS[:3]) | {"support": 0}
        )
    for average in ("macro avg", "weighted avg"):
        if average in found:
            report[average] = {**found[average], "support": int(found[average]["support"])}
    if "accuracy" in found:
        report["accuracy"] = found["accuracy"]
    return _text(report, [str(label) for label in ordered], len(true), digits), report


def _text(report: dict, names: list[str], total: int, digits: int) -> str:
    width = max([len(name) for name in names] + [len("weighted avg"), digits])

    def line(name: str, cells: list) -> str:
        return f"{name:>{width}} " + "".join(f" {cell:>9}" for cell in cells)

    def row(name: str) -> str:
        scores = report[name]
        cells = [UNSCORED if scores[h] is None else f"{scores[h]:.{digits}f}" for h in HEADERS[:3]]
        return line(name, [*cells, scores["support"]])

    lines = [line("", list(HEADERS)), "", *(row(name) for name in names), ""]
    if "accuracy" in report:  # nothing evaluated: no accuracy, no averages
        lines.append(line("accuracy", ["", "", f"{report['accuracy']:.{digits}f}", total]))
    lines += [row(name) for name in ("macro avg", "weighted avg") if name in report]
    if any(report[name]["precision"] is None for name in names):
        lines += ["", UNSCORED_NOTE]
    return "\n".join(lines) + "\n"


def f1_rows(report: dict, labels: Sequence[Hashable]) -> dict[str, dict]:
    """``{label: {"this": F1 or None, "support": n}}`` of a `label_report` dict, for each of
    ``labels``: what ``lowbit eval --json`` prints as ``per_label_f1``. "this" is the model
    evaluated, as the JSON of a quantized or pruned folder names its own model's F1 beside its
    source's "reference", so that a script reads a run's and its folder's rows alike; None for a
    label neither present nor predicted."""
    return {
        str(label): {
            "this": report[str(label)]["f1-score"],
            "support": report[str(label)]["support"],
        }
        for label in labels
    }
