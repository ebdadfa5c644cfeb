"""Evaluating a quantized or pruned model against the model it was made from.

Both models run with fp32 activations and the same batches, so the difference is what the
quantization (or pruning) costs: perplexity for a causal LM, accuracy and per-label F1 for
classification. The reference is the folder's source (the run's checkpoint, or the pruned folder
a quantized one was made from); when it is gone, only the folder's own metrics are reported.
"""

from __future__ import annotations

import contextlib

import torch

from lowbit.errors import UsageError
from lowbit.infer.io import (
    describe_manifest,
    load_baseline,
    load_source,
    training_run,
)
from lowbit.infer.model import quant_layers

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


def _per_label(task, labels, preds) -> dict[str, dict]:
    """F1 and support per label from flat label/prediction ids (ignored positions dropped)."""
    from sklearn.metrics import precision_recall_fscore_support

    keep = labels != -100
    labels, preds = labels[keep].numpy(), preds[keep].numpy()
    names = getattr(task, "id2label", None)
    ids = sorted(set(labels.tolist()) | set(preds.tolist()))
    _, _, f1, support = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    return {
        str(names[i] if names else i): {"f1": float(f), "support": int(s)}
        for i, f, s in zip(ids, f1, support)
    }


def compare(
    task, model, baseline, split: str, max_batches=None, device="cpu", missing=None
) -> tuple[dict, list]:
    """(metrics with ``baseline`` and ``change`` entries, report lines) of ``model`` vs ``baseline``;
    without a ``baseline``, the model's own metrics and why there is none (``missing``, or the
    source run is gone)."""
    precision = fp32_precision(device)
    metrics = task.evaluate(model, precision, split, max_batches or 0)
    if baseline is None:  # the folder's own metrics, with nothing to compare them to
        lines = [f"{'metric':<12}{'this':>12}"]
        lines += [
            f"{key:<12}{value:>12.4f}" for key, value in metrics.items() if isinstance(value, float)
        ]
        gone = missing or "the source run is gone"
        return metrics, [*lines, f"({gone}: no reference to compare against)"]
    base = task.evaluate(baseline, precision, split, max_batches or 0)
    lines = [f"{'metric':<12}{'reference':>12}{'this':>12}   change"]
    for key, value in metrics.items():
        if isinstance(value, float) and key in base:
            lines.append(f"{key:<12}{base[key]:>12.4f}{value:>12.4f}   {_change(base[key], value)}")
    out = {**metrics, "baseline": base}
    if hasattr(task, "predict"):
        _, labels_b, preds_b = task.predict(baseline, precision, split, max_batches)
        _, labels_q, preds_q = task.predict(model, precision, split, max_batches)
        per_b, per_q = _per_label(task, labels_b, preds_b), _per_label(task, labels_q, preds_q)
        lines += ["", "per-label F1 (token level)" if labels_q.dim() > 1 else "per-label F1"]
        lines.append(f"{'label':<14}{'reference':>10}{'this':>10}{'change':>10}{'support':>9}")
        per = {}
        for label in sorted(set(per_b) | set(per_q), key=lambda x: (len(x), x)):
            fb = per_b.get(label, {"f1": 0.0, "support": 0})
            fq = per_q.get(label, {"f1": 0.0, "support": 0})
            per[label] = {"reference": fb["f1"], "this": fq["f1"]}
            lines.append(
                f"{label:<14}{fb['f1']:>10.4f}{fq['f1']:>10.4f}{fq['f1'] - fb['f1']:>+10.4f}"
                f"{max(fb['support'], fq['support']):>9}"
            )
        out["per_label_f1"] = per
    return out, lines


def size_change(before: int, after: int) -> str:
    """``2.95x smaller``, or ``1.12x larger`` where the new file is (int4 in groups of 1 or 2
    stores more scale than it saves)."""
    if after > before:
        return f"{after / before:.2f}x larger"
    return f"{before / after:.2f}x smaller"


def evaluate_inference_dir(path, split="validation", max_batches=None, device=None, progress=False):
    """Metrics and the printable report of an inference folder, against its source; with
    ``progress``, `lowbit.train.evaluate.eval_progress` on stderr meanwhile."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; fix: use train, validation or test")
    if max_batches is not None and max_batches < 1:  # as `lowbit eval`: 0 would evaluate all
        raise UsageError(f"--max-batches {max_batches}: fix: use 1 or more (or leave it out: all)")
    from lowbit.train.evaluate import check_same_data, eval_progress
    from lowbit.train.trainer import resolve_device

    device = resolve_device(device or "cpu")

    source = load_source(path, device)
    if source.manifest is None:  # `load_source` reads training runs too (quantize's input)
        raise UsageError(
            f"{path}: a training run, not a folder written by lowbit quantize/prune; fix: "
            "evaluate it with lowbit.train.evaluate_run (lowbit eval reads either)"
        )
    # the data the training run read, as its run.json recorded it
    check_same_data(training_run(path), source.config, source.task.fingerprint)
    baseline, missing = load_baseline(source.manifest, device)
    reference = baseline and baseline.model
    models = [source.model] if reference is None else [source.model, reference]
    # `compare`: each model's metrics, and for a classifier each model's predictions again
    passes = len(models) * (2 if reference is not None and hasattr(source.task, "predict") else 1)
    shown = eval_progress(source.task, models, split, max_batches, passes)
    with shown if progress else contextlib.nullcontext():
        metrics, lines = compare(
            source.task, source.model, reference, split, max_batches, device, missing
        )
    c = source.config
    head = [
        f"{c.task} {c.model}: {describe_manifest(source.manifest)}, from "
        f"{source.manifest['source']['path']} (step {source.step}), {split} split",
        "reference: the source model in fp32; this: the folder's model (kernels below)"
        if baseline is not None
        else f"this: the folder's model (kernels below); {missing or 'its source run is gone'}",
    ]
    note = kernel_note(source.model)
    if note:
        head.append(f"kernels: {note}")
    sizes = source.manifest.get("bytes")
    if sizes:
        original = source.manifest["source"].get("original", "the source")  # older folders
        head.append(
            f"size: {original} {sizes['original'] / 1e6:.3f} MB -> {sizes['quantized'] / 1e6:.3f} "
            f"MB ({size_change(sizes['original'], sizes['quantized'])})"
        )
    result = {"step": source.step, "split": split, **metrics}
    return result, "\n".join([*head, "", *lines])
