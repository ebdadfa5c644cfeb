"""Evaluating a quantized or pruned model against the model it was made from.

Both models run with fp32 activations and the same batches, so the difference is what the
quantization (or pruning) costs: perplexity for a causal LM, accuracy and per-label F1 for
classification. The reference is the folder's source (the run's checkpoint, or the pruned folder
a quantized one was made from); when it is not there (moved or deleted), only the folder's own
metrics are reported.
"""

from __future__ import annotations

import contextlib

import torch

from lowbit.errors import UsageError
from lowbit.infer.io import (
    WEIGHTS,
    describe_manifest,
    load_baseline,
    load_source,
    source_bytes,
    tensor_bytes_of,
    training_run,
)
from lowbit.infer.model import quant_layers
from lowbit.train.tasks import metric_text

SPLITS = ("train", "validation", "test")


def fp32_precision(device="cpu"):
    import lowbit

    return lowbit.Precision("fp32", device=device)


def kernel_note(model: torch.nn.Module) -> str | None:
    """How the quantized layers run (real int8 kernel or emulation), one line."""
    notes = sorted({layer.note() for layer in quant_layers(model).values()})
    return "; ".join(notes) if notes else None


def _change(before: float, after: float) -> str:
    if before == 0:
        return f"{after - before:+.4f}"
    return f"{after - before:+.4f} ({(after - before) / abs(before):+.2%})"


# a report's rows of F1 (`lowbit.data.label_report.f1_rows`' shape), each paired with the
# reference's: a classifier's per label, a tagger's per entity type too; and their tables' titles
ROWS = {"per_label_f1": "per-label F1", "per_entity_f1": "entity F1"}


def _scored(task, model, precision, split: str, max_batches) -> tuple[dict, dict]:
    """(metrics, ``{key: rows}`` of the `ROWS` the report has: none for a causal LM) of ``model``
    on ``split``, from the task's report: one pass over the batches, whose metrics are
    `Task.evaluate`'s (a classifier's predictions for its per-label F1 were a second pass
    before)."""
    metrics, _ = task.report(model, precision, split, max_batches)
    return metrics, {key: metrics.pop(key) for key in ROWS if key in metrics}


def _per_label(task, per_b: dict | None, per_q: dict, key="per_label_f1") -> tuple[dict, list]:
    """(``per_label_f1`` of the JSON, the table's lines) of the model's per-label F1 rows
    (`lowbit.data.label_report.f1_rows`) and of its reference's (None: there is none). Every
    class of the task has a row; one that neither model met (absent from the batches and never
    predicted) has no F1, ``-``. One that only the other model predicted scores 0 as scikit-learn
    scores it (``zero_division=0``), the number this table showed before."""
    from lowbit.data.label_report import UNSCORED, UNSCORED_NOTE

    def cell(value, sign="") -> str:
        return f"{UNSCORED:>10}" if value is None else f"{value:>{sign}10.4f}"

    token = task.config.task == "token-classification" and key == "per_label_f1"
    lines = [f"{ROWS[key]} (token level)" if token else ROWS[key]]
    if per_b is None:
        lines.append(f"{'label':<14}{'this':>10}{'support':>9}")
    else:
        lines.append(f"{'label':<14}{'reference':>10}{'this':>10}{'change':>10}{'support':>9}")
    per = {}
    for label in sorted(per_q, key=lambda x: (len(x), x)):
        q, support = per_q[label]["this"], per_q[label]["support"]
        if per_b is None:
            per[label] = {"this": q, "support": support}
            lines.append(f"{label:<14}{cell(q)}{support:>9}")
            continue
        b = per_b[label]["this"]
        if (b is None) != (q is None):  # met by one model only: the other scores 0 on it
            b, q = (0.0 if b is None else b), (0.0 if q is None else q)
        per[label] = {"reference": b, "this": q, "support": support}
        change = None if q is None else q - b
        lines.append(f"{label:<14}{cell(b)}{cell(q)}{cell(change, '+')}{support:>9}")
    if any(row["this"] is None for row in per.values()):
        lines.append(UNSCORED_NOTE)
    return per, lines


def compare(
    task, model, baseline, split: str, max_batches=None, device="cpu", missing=None
) -> tuple[dict, list]:
    """(metrics with ``baseline`` and ``change`` entries, report lines) of ``model`` vs ``baseline``;
    without a ``baseline``, the model's own metrics and why there is none (``missing``). A
    classifier's metrics add ``per_label_f1``. Each model runs the batches once."""
    precision = fp32_precision(device)
    metrics, per_q = _scored(task, model, precision, split, max_batches)
    if baseline is None:  # the folder's own metrics, with nothing to compare them to
        lines = [f"{'metric':<12}{'this':>12}"]
        # None: a metric that does not apply (entity F1 of a split without entities), n/a
        lines += [
            f"{key:<12}{metric_text(value):>12}"
            for key, value in metrics.items()
            if isinstance(value, float) or value is None
        ]
        lines.append(f"(no reference to compare against{f': {missing}' if missing else ''})")
        for key, rows in per_q.items():
            metrics[key], table = _per_label(task, None, rows, key)
            lines += ["", *table]
        return metrics, lines
    base, per_b = _scored(task, baseline, precision, split, max_batches)
    lines = [f"{'metric':<12}{'reference':>12}{'this':>12}   change"]
    for key, value in metrics.items():
        if isinstance(value, float) and isinstance(base.get(key), float):
            lines.append(f"{key:<12}{base[key]:>12.4f}{value:>12.4f}   {_change(base[key], value)}")
        elif key in base and (value is None or base[key] is None):  # n/a for one or both
            shown = f"{metric_text(base[key]):>12}{metric_text(value):>12}"
            lines.append(f"{key:<12}{shown}   {metric_text(None)}")
    out = {**metrics, "baseline": base}
    for key, rows in per_q.items():
        out[key], table = _per_label(task, per_b[key], rows, key)
        lines += ["", *table]
    return out, lines


def size_change(before: int, after: int) -> str:
    """``2.95x smaller``, or ``1.12x larger`` where the new file is (int4 in groups of 1 or 2
    stores more scale than it saves)."""
    if after > before:
        return f"{after / before:.2f}x larger"
    return f"{before / after:.2f}x smaller"


def evaluate_inference_dir(
    path,
    split="validation",
    max_batches=None,
    device=None,
    progress=False,
    data=None,
    text_field=None,
):
    """Metrics and the printable report of an inference folder, against its source; with
    ``progress``, `lowbit.train.evaluate.eval_progress` on stderr meanwhile; ``data``: on that
    file or folder instead of the run's (`lowbit eval --data`, `Task.use_eval_data`), its JSON
    records' ``text_field`` (`lowbit eval --text-field`)."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; fix: use train, validation or test")
    from lowbit.train.evaluate import (
        check_max_batches,
        check_same_data,
        check_text_field,
        data_fields,
        eval_progress,
        evaluated_on,
    )
    from lowbit.train.trainer import resolve_device

    max_batches = check_max_batches(max_batches) or None  # 0: every batch, as `lowbit eval`
    device = resolve_device(device or "cpu")

    source = load_source(path, device)
    if source.manifest is None:  # `load_source` reads training runs too (quantize's input)
        raise UsageError(
            f"{path}: a training run, not a folder written by lowbit quantize/prune; fix: "
            "evaluate it with lowbit.train.evaluate_run (lowbit eval reads either)"
        )
    check_text_field(source.config, data, text_field)
    if data is None:  # the data the training run read, as its run.json recorded it
        check_same_data(training_run(path), source.config, source.task.fingerprint, path)
    else:
        source.task.use_eval_data(data, split, text_field)
    baseline, missing = load_baseline(source.manifest, device)
    reference = baseline and baseline.model
    models = [source.model] if reference is None else [source.model, reference]
    # `compare` runs the batches once through each model
    shown = eval_progress(source.task, models, split, max_batches, data)
    with shown if progress else contextlib.nullcontext():
        metrics, lines = compare(
            source.task, source.model, reference, split, max_batches, device, missing
        )
    c = source.config
    head = [
        f"{c.task} {c.model}: {describe_manifest(source.manifest)}, from "
        f"{source.manifest['source']['path']} (step {source.step}), {evaluated_on(split, data)}",
        "reference: the source model in fp32; this: the folder's model (kernels below)"
        if baseline is not None
        else f"this: the folder's model (kernels below); {missing}",
    ]
    note = kernel_note(source.model)
    if note:
        head.append(f"kernels: {note}")
    sizes = source.manifest.get("bytes")
    if sizes:
        # tensor bytes from the files, not as recorded: a folder written before session 41
        # recorded its file's size, header included (1.83x for the digits CNN's int8, 2.00x in
        # tensors); a source folder still there is read so too (`source_bytes`)
        folder = baseline is not None and baseline.manifest is not None  # a pruned source
        sizes = {
            "original": source_bytes(baseline) if folder else sizes["original"],
            "quantized": tensor_bytes_of(source.path / WEIGHTS),
        }
        original = source.manifest["source"].get("original", "the source")  # older folders
        # a folder only pruned is no smaller, as `lowbit prune` said: "1.00x larger" (its file's
        # header against the checkpoint's tensors) read as if pruning had grown the model
        change = (
            size_change(sizes["original"], sizes["quantized"])
            if source.manifest.get("quantization")
            else "stored dense in fp32, zeros included"
        )
        head.append(
            f"size: {original} {sizes['original'] / 1e6:.3f} MB -> {sizes['quantized'] / 1e6:.3f} "
            f"MB ({change})"
        )
    result = {"step": source.step, **data_fields(split, data), **metrics}
    return result, "\n".join([*head, "", *lines])
