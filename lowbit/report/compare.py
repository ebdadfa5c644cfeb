"""Side-by-side recipe studies: train one task per (recipe, seed), then compare them to a baseline.

Every run trains the same task, model, data order and seeds; only the recipe changes. Runs live in
``<out>/runs/<recipe>/seed-<n>/`` (ordinary `lowbit train` run folders) and are trained one after
the other, or several at a time in worker processes (``jobs``, `lowbit.report.parallel`). A finished run leaves ``compare.json`` beside its ``config.yaml`` and is reused by the
next invocation; an interrupted one (checkpoint, no ``compare.json``) is resumed through the
trainer's resume, which continues bit for bit.

Statistics. Seeds are paired: seed ``s`` of a recipe and seed ``s`` of the baseline share the
initialization and data order, so the per-seed difference ``d_s = loss_r,s - loss_b,s`` removes
most of the seed-to-seed variance. The gap is ``mean(d) / mean(loss_b)`` in percent and its
*spread* is ``std(d) / mean(loss_b)`` (sample std over seeds). A difference is significant when the
gap is larger than twice the spread (with one seed there is no spread and nothing is called
significant). A recipe is within tolerance when its gap is at most its tolerance ("unresolved"
when gap + 2 x spread is above it); above it, the verdict is "outside tolerance" when the excess is
larger than twice the spread and "inconclusive" when the seeds cannot tell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.errors import (
    Terminated,
    UsageError,
    check_writable,
    file_in_the_way,
    say_held_notes,
)
from lowbit.report.plots import FILES as PLOT_FILES
from lowbit.train.config import is_write_leftover, write_atomically
from lowbit.train.logging import METRICS
from lowbit.train.runstate import RunLock
from lowbit.train.tasks import data_fingerprint, same_data

RECORD = "compare.json"  # written into a run folder when the run is finished and measured
# Written into a run folder as it starts or resumes training: the largest --jobs of its parts and
# the thread counts they trained on (`run_one`), which an interrupted run's record, written by a
# later invocation, could not know.
LOAD = "compare-jobs.json"
SETTINGS = "compare.json"  # written into the compare folder: what the study is
REPORT_DIR = "report"
# The files `compare` writes into the report folder (the plots among them unless --no-plots)
REPORT_FILES = ("report.md", "report.html", "results.json", *PLOT_FILES)
# Settings of a run that may differ for a finished run to be reused: where it is written, where
# it logs, and which checkpoints it keeps (the losses do not depend on them); and the device as
# spelled (`auto`), which is compared as it resolves instead (`_check_device`).
_NOT_COMPARED = {"out", "device", "wandb", "save_interval", "keep_last"}


@dataclass(frozen=True)
class Target:
    """How far a recipe's final validation loss may be above the baseline's, in percent.

    ``expect_worse``: the claim is the opposite, the recipe is measurably worse than ``pct``
    (``bf16-pure``: without stochastic rounding or Kahan summation, updates smaller than half a
    bf16 ulp of the weight are lost).
    """

    pct: float
    source: str = ""
    expect_worse: bool = False


# Parity targets: gap of the final validation loss to fp32 (applied when the baseline is fp32).
PARITY_TARGETS: dict[str, Target] = {
    **{
        name: Target(0.5, "Micikevicius 2018: mixed precision loses nothing")
        for name in ("bf16-mixed", "fp16-mixed", "bf16-low", "fp16-low")
    },
    "bf16-pure-sr": Target(1.0, "Zamirai 2020: pure bf16 with stochastic rounding"),
    "bf16-pure-kahan": Target(1.0, "Zamirai 2020: pure bf16 with Kahan summation"),
    "bf16-pure": Target(1.0, "Zamirai 2020: pure bf16 with nearest rounding loses", True),
    **{
        name: Target(1.0, "DeepSeek-V3: fp8 below 0.25%")
        for name in ("fp8-tensorwise", "fp8-delayed", "fp8-rowwise", "fp8-blockwise")
    },
    "mxfp8": Target(1.0, "OCP MX / Rouhani 2023, DeepSeek-V3 for 8 bits"),
    "mxfp8-rceil": Target(1.0, "OCP MX / Rouhani 2023, DeepSeek-V3 for 8 bits"),
    "mxfp6": Target(1.5, "Rouhani 2023: MXFP6 close to fp32"),
    "mxfp6-rceil": Target(1.5, "Rouhani 2023: MXFP6 close to fp32"),
    "nvfp4": Target(2.0, "NVIDIA 2025: NVFP4 about 1-1.5%"),
    "mxfp4": Target(3.0, "Tseng 2025: MXFP4 with SR and random Hadamard"),
}

# The tasks whose runs count validation accuracy per label (`_per_label`: their tasks predict).
LABELLED_TASKS = ("token-classification", "image-classification")

TASK_METRIC = {
    "causal-lm": "ppl",
    "token-classification": "entity_f1",
    "image-classification": "accuracy",
}


# why a study refuses --nproc and --strategy, as flags (`lowbit.commands.compare`) or in a
# --config file (`make_study`)
ONE_PROCESS = (
    "a compare study trains every run in one process (--jobs trains several runs at a time)"
)


def parse_recipes(text: str | list[str]) -> list[str]:
    """``"fp32,bf16-mixed"`` -> names, checked against the registry (`UsageError` otherwise)."""
    from lowbit.recipes.presets import accepted_names, did_you_mean, spelt_alike

    names = [str(n).strip() for n in (text.split(",") if isinstance(text, str) else text)]
    if not any(names):
        raise UsageError("no recipes given; fix: --recipes fp32,bf16-mixed,...")
    if not all(names):  # `fp32,,bf16-mixed`: a recipe left out by mistake, not a spacer
        position = names.index("") + 1
        raise UsageError(
            f"--recipes entry {position} is empty ({','.join(names)!r}); fix: name a recipe "
            "there or drop the extra comma"
        )
    given, names = names, [_recipe_name(name) for name in names]
    valid = accepted_names()  # the presets, and auto:fp6 / auto:fp4
    for name in names:
        if name not in valid:
            alike = [] if ":" in name else spelt_alike(name, valid)  # auto:fp3: the list
            fix = did_you_mean(alike) if alike else f"use names from: {', '.join(valid)}"
            raise UsageError(f"unknown recipe {name!r} in --recipes; fix: {fix}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        spelt = sorted({g for g, n in zip(given, names) if n == dup})
        # `auto:fp8,auto`: two spellings of one recipe, which the message names
        alias = f" ({' and '.join(spelt)} are one recipe)" if len(spelt) > 1 else ""
        raise UsageError(
            f"recipe {spelt[0]!r} is listed twice in --recipes{alias}; fix: list it once"
        )
    return names


def _recipe_name(name: str) -> str:
    """A recipe as a study names it: auto:fp8 is auto (its default budget), one name, so that
    listing both is a duplicate and ``--baseline auto:fp8`` or ``--target auto:fp8=2`` name the
    ``auto`` of ``--recipes auto:fp8`` (refused as not in --recipes, they were)."""
    name = name.strip()
    return "auto" if name == "auto:fp8" else name


def parse_targets(items) -> dict[str, float]:
    """``["mxfp4=3", ...]`` -> ``{"mxfp4": 3.0}``; a recipe given twice is refused (the last
    value silently won: ``--target mxfp4=3 --target mxfp4=1`` judged mxfp4 by 1% alone)."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = _recipe_name(name)
        if name in out:
            raise UsageError(f"--target {name} is given twice; fix: give each recipe one --target")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not math.isfinite(out.get(name, math.nan)):
            raise UsageError(f"--target {item!r}: expected RECIPE=PERCENT; fix: e.g. mxfp4=3")
    return out


@dataclass
class Study:
    """What a compare run is: recipes x seeds of one base config, and how to judge them."""

    recipes: list[str]
    seeds: list[int]
    baseline: str
    base: dict  # TrainConfig fields except recipe, seed, out
    out: Path
    tolerance: float = 1.0
    targets: dict[str, float] = field(default_factory=dict)  # explicit per-recipe tolerances
    parity_targets: bool = True

    def target(self, recipe: str) -> Target:
        if recipe in self.targets:
            return Target(self.targets[recipe], "--target")
        if self.parity_targets and self.baseline == "fp32" and recipe in PARITY_TARGETS:
            return PARITY_TARGETS[recipe]
        return Target(self.tolerance, "--tolerance")

    def run_dir(self, recipe: str, seed: int) -> Path:
        return self.out / "runs" / recipe / f"seed-{seed}"

    def settings(self) -> dict:
        return {
            "recipes": self.recipes,
            "seeds": self.seeds,
            "baseline": self.baseline,
            "base": self.base,
        }


def make_study(
    recipes,
    base_config=None,
    seeds=3,
    baseline: str | None = None,
    out=None,
    tolerance: float = 1.0,
    targets: dict[str, float] | None = None,
    parity_targets: bool = True,
) -> Study:
    """Validate the inputs of a study; every error is a one-line `UsageError`."""
    from lowbit.train.config import TrainConfig, build_config, resolve

    recipes = parse_recipes(recipes)
    if isinstance(seeds, int):
        if seeds <= 0:
            raise UsageError(f"--seeds must be positive, got {seeds}; fix: --seeds 3")
        seeds = list(range(seeds))
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UsageError("no seeds given; fix: seeds=3, or a list such as [0, 1, 2]")
    if len(set(seeds)) != len(seeds):  # one run counted twice: seeds that agree exactly
        dup = next(s for s in seeds if seeds.count(s) > 1)
        raise UsageError(f"seed {dup} is listed twice; fix: list each seed once")
    if any(seed < 0 for seed in seeds):  # NumPy's generator takes none, and every run seeds it
        raise UsageError(f"seeds must be non-negative, got {min(seeds)}; fix: --first-seed 0")
    if max(seeds) >= 2**32:  # `lowbit train`'s range: refused here, not at the run that has it
        raise UsageError(
            f"seeds must be below 2**32, got {max(seeds)}; fix: a lower --first-seed, e.g. 0"
        )
    baseline = recipes[0] if baseline is None else _recipe_name(baseline)
    targets = {_recipe_name(name): pct for name, pct in (targets or {}).items()}
    if baseline not in recipes:
        raise UsageError(
            f"baseline {baseline!r} is not in --recipes ({','.join(recipes)}); fix: add it to "
            "--recipes or choose one of them"
        )
    if not math.isfinite(tolerance) or tolerance < 0:
        raise UsageError(
            f"--tolerance must be a non-negative percent, got {tolerance:g}; fix: e.g. "
            "--tolerance 1"
        )
    for name, pct in (targets or {}).items():
        if name not in recipes:
            raise UsageError(f"--target {name}: not in --recipes; fix: drop it or add the recipe")
        if name == baseline:  # taken and never read: the baseline has no gap to itself
            raise UsageError(
                f"--target {name}: {name} is the baseline, which is not judged; fix: drop it, or "
                "--baseline another recipe"
            )
        if not math.isfinite(pct) or pct < 0:
            raise UsageError(
                f"--target {name}={pct:g}: a tolerance is a non-negative percent; fix: e.g. "
                f"{name}=1"
            )
    if isinstance(base_config, TrainConfig):
        base = base_config.to_dict()
    else:
        base = build_config(base_config or {}).to_dict()
    for key in ("recipe", "seed", "out"):
        base.pop(key, None)
    if base.get("nproc", 1) != 1 or base.get("strategy") is not None:  # from a --config file
        raise UsageError(
            f"nproc {base.get('nproc')}, strategy {base.get('strategy')}: {ONE_PROCESS}; fix: "
            "drop nproc and strategy from the --config file"
        )
    scaling = {key: base.get(key) for key in _LOSS_SCALE_SETTINGS}
    if any(v is not None for v in scaling.values()) and all(
        _without_loss_scaling(name) for name in recipes
    ):
        raise UsageError(
            "--loss-scale/--loss-scale-growth-interval: none of the recipes scales its loss (the "
            "fp16 recipes do); fix: drop them or add fp16-mixed or fp16-low"
        )
    resolved = {  # every recipe's runs must be valid (overrides, loss scaling)
        name: resolve(
            build_config(
                {**_recipe_settings({**base, "seed": seeds[0], "out": "x"}, name), "recipe": name}
            )
        )
        for name in recipes
    }
    _check_autocast(resolved.values())
    _check_model(resolved[baseline])
    base = {
        k: v for k, v in resolved[baseline].to_dict().items() if k not in ("recipe", "seed", "out")
    }
    base.update(scaling)  # the baseline's runs may not take them; the fp16 recipes' do
    if out is None:
        out = _default_or_older_out(base)
    return Study(
        recipes=recipes,
        seeds=seeds,
        baseline=baseline,
        base=base,
        out=Path(out),
        tolerance=float(tolerance),
        targets=dict(targets or {}),
        parity_targets=parity_targets,
    )


def default_out(task: str, model: str) -> Path:
    """``runs/compare-<task>-<name>``: a named model by its name, a --model folder by its parent
    folder's name and its own (``RUN/model`` -> ``RUN-model``, ``~/models/llama/model`` ->
    ``llama-model``). Named by the folder alone, every run's exported ``model`` folder (or any
    other folder of that name) shared one study folder, which the next such study was refused."""
    if not _is_model_folder(task, model):
        return Path("runs") / f"compare-{task}-{model}"
    folder = Path(model).resolve()  # `.`, `..`, a trailing `/`: the folder's own names
    name = "-".join(part for part in (folder.parent.name, folder.name) if part)
    return Path("runs") / f"compare-{task}-{name}"


def _default_or_older_out(base: dict) -> Path:
    """`default_out`, or the name a --model folder's study had before session 38
    (``runs/compare-<task>-<folder name>``) where the new one does not exist and the old one holds
    a study of these settings (`_saved_changes`): the same command, run again, goes on with that
    study's runs instead of retraining every one of them in a new folder."""
    task, model = base["task"], base["model"]
    out = default_out(task, model)
    if out.exists() or not _is_model_folder(task, model):
        return out
    older = Path("runs") / f"compare-{task}-{Path(str(model)).name}"
    if older != out and (older / SETTINGS).is_file() and not _saved_changes(older, base):
        print(f"lowbit: reusing the study in {older} (named before session 38)", file=sys.stderr)
        return older
    return out


def _is_model_folder(task: str, model: str) -> bool:
    """Whether ``model`` names a --model folder a task's runs load, not a named model (a size,
    built afresh from the seed; ``minilm``, an installed package's; the digits CNN's size)."""
    from lowbit.models import causal_lm, token_classifier

    if task == "image-classification":
        return False
    named = causal_lm.SIZES if task == "causal-lm" else (*token_classifier.SIZES, "minilm")
    return model not in named


def _check_model(config) -> None:
    """Refuse a --model the task cannot build (a causal LM's size for the digits CNN, a path with
    nothing at it) before the study writes its folder, in the words of the run's own set-up, which
    refuses it only after the study's compare.json is written. A checkpoint folder's weights are
    left to the run to read: only its config is."""
    from lowbit.models import build_cnn, causal_lm, token_classifier

    if config.task == "image-classification":
        build_cnn(config.model)  # a few thousand parameters
    elif config.task == "causal-lm" and config.model not in causal_lm.SIZES:
        causal_lm.folder_config(config.model)
    elif config.task == "token-classification" and config.model not in token_classifier.SIZES:
        token_classifier._resolve(config.model)  # minilm's folder, or a folder with config.json


def _check_autocast(configs) -> None:
    """Refuse a recipe whose autocast the model's architecture cannot take (DeBERTa v1,
    `lowbit.models.pretrained.NO_AUTOCAST`) before any run starts: `lowbit.Precision.convert`
    refuses it too, but only when that recipe's first run builds its model, after every run of
    the recipes before it has trained. Autocast depends on the device (fp16-mixed emulates fp16
    on a CPU, without autocast), resolved as the trainer resolves it."""
    import lowbit
    from lowbit.models.pretrained import NO_AUTOCAST, check_autocast_for, model_type_of
    from lowbit.train.config import recipe_of
    from lowbit.train.trainer import resolve_device

    for config in configs:
        model_type = model_type_of(config.model)
        if model_type in NO_AUTOCAST:
            precision = lowbit.Precision(recipe_of(config), device=resolve_device(config.device))
            check_autocast_for(model_type, precision.autocast_dtype, config.recipe)


def run_config(study: Study, recipe: str, seed: int):
    from lowbit.train.config import TrainConfig

    settings = _recipe_settings(study.base, recipe)
    return TrainConfig(
        **{**settings, "recipe": recipe, "seed": seed, "out": str(study.run_dir(recipe, seed))}
    )


# Settings only recipes with loss scaling take: a study of fp32 against fp16-mixed at another
# loss scale trains fp32 as usual (and reuses its runs from studies without the setting).
_LOSS_SCALE_SETTINGS = ("loss_scale", "loss_scale_growth_interval")


def _without_loss_scaling(recipe: str) -> bool:
    from lowbit.recipes import LossScaling, get_recipe

    return get_recipe(recipe).loss_scaling is LossScaling.NONE


def _recipe_settings(settings: dict, recipe: str) -> dict:
    """``settings`` as one recipe's runs take them (see ``_LOSS_SCALE_SETTINGS``)."""
    if _without_loss_scaling(recipe):
        return {**settings, **dict.fromkeys(_LOSS_SCALE_SETTINGS)}
    return settings


# ------------------------------------------------------------------------------------ running


def _changed_settings(saved: dict, now: dict) -> str:
    """The settings that differ, as ``"steps 540, now 1080"`` (empty when they are equal); a
    setting one side lacks (a field added to TrainConfig since) counts as its default."""
    from lowbit.train.config import TrainConfig

    default = TrainConfig().to_dict()
    changed = []
    for key in sorted((set(saved) | set(now)) - _NOT_COMPARED):
        before, after = saved.get(key, default.get(key)), now.get(key, default.get(key))
        if before != after:
            shown = [f"{v:.6g}" if isinstance(v, float) else repr(v) for v in (before, after)]
            if shown[0] == shown[1]:  # floats equal to 6 digits: all of them
                shown = [repr(before), repr(after)]
            changed.append(f"{key} {shown[0]}, now {shown[1]}")
    return "; ".join(changed)


def load_record(run_dir: Path, config) -> dict | None:
    """The finished run's record if it was trained with ``config``'s settings, else ``None``."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    changed = _changed_settings(record.get("config", {}), config.to_dict())
    if changed:
        raise UsageError(
            f"{run_dir}: holds a finished run with other settings ({changed}); fix: --overwrite "
            "to retrain, or another --out"
        )
    now = _data_now(config.task, config.data, config.text_field)
    if not same_data(record.get("data_fingerprint"), now):
        raise UsageError(
            f"{run_dir}: holds a finished run trained on other contents of {config.data}; fix: "
            "--overwrite to retrain on the data as it is now, or restore the data"
        )
    _check_same_model(run_dir, "a finished", record.get("model_fingerprint"), config)
    if not (Path(run_dir) / METRICS).is_file():  # found before any run trains, not at the report
        raise UsageError(
            f"{run_dir}: holds a finished run without its {METRICS}, the loss curves the "
            f"report reads; fix: restore the file, or remove {run_dir} to train that run again"
        )
    _check_same_length(run_dir, record)
    return record


def _check_same_length(run_dir: Path, record: dict) -> None:
    """Refuse a finished run whose folder trained again after its record was written, to another
    step (`lowbit train --resume --steps N` in it, finished or stopped on the way, or
    `--overwrite` with other --steps): the record, reused as it was, reported fp32's seed 0 at
    step 20, loss 3.8750, beside the metrics.jsonl and checkpoint of its run at step 30, loss
    3.5879."""
    from lowbit.train.config import read_run_info

    info = read_run_info(run_dir)  # completed, or stopped again: interrupted, non-finite
    step, steps = info.get("step"), record.get("steps")
    if isinstance(step, int) and step != steps:
        raise UsageError(
            f"{run_dir}: holds a finished run that trained again after the study recorded it "
            f"(now at step {step}, recorded at step {steps}); fix: remove {run_dir} to train "
            "that run again, or --overwrite to retrain the study"
        )


def model_fingerprint(task: str, model: str) -> dict | None:
    """The `folder_fingerprint` of the --model folder a task's runs load; None for a named
    model (a size, built afresh from the seed, or the digits CNN) and ``minilm`` where its
    package is not installed (the run names the problem)."""
    from lowbit.models import token_classifier
    from lowbit.models.pretrained import folder_fingerprint

    if task == "token-classification" and model == "minilm":
        folder = token_classifier.find_minilm()
        return None if folder is None else folder_fingerprint(folder)
    return folder_fingerprint(model) if _is_model_folder(task, model) else None


def _check_same_model(run_dir: Path, state: str, recorded: dict | None, config) -> None:
    """Refuse to reuse or resume a run whose --model folder holds other files than it trained from
    (weights trained again, a config edited): its results would be reported as the model's as
    it is now. A record from before session 30, or a named model, has no fingerprint: reused."""
    now = _model_now(config.task, config.model)
    if not recorded or not now or recorded == now:
        return
    changed = sorted(
        name for name in set(recorded) | set(now) if recorded.get(name) != now.get(name)
    )
    shown = ", ".join(map(_touched, changed[:3], [recorded] * 3, [now] * 3))
    shown += ", ..." if len(changed) > 3 else ""
    raise UsageError(
        f"{run_dir}: holds {state} run trained from other contents of the model folder "
        f"{config.model} ({shown} changed since); fix: --overwrite to retrain from the model as "
        "it is now, or restore the folder"
    )


def _touched(name: str, recorded: dict, now: dict) -> str:
    """``name`` as the refusal lists it, saying so where a large file's size is the same and only
    its modification time changed: a copy without ``-p`` (``cp -r``, a re-extraction) of
    unchanged weights, which the user can tell from retrained ones."""
    before, after = recorded.get(name, ""), now.get(name, "")
    same_size = before.startswith("size:") and before.split(",")[0] == after.split(",")[0]
    return f"{name} (same size, modification time only)" if same_size else name


# The data's and the model folder's fingerprints as they are now, read once per process for every
# run of a study, and read again by the next study (`compare` clears them: the files may have
# changed in between, in a notebook or a script that runs several studies).
_data_now = functools.lru_cache(maxsize=4)(data_fingerprint)
_model_now = functools.lru_cache(maxsize=4)(model_fingerprint)


def _memory(trainer) -> dict:
    """Training memory by component, measured on the live run (`lowbit.memory`): one extra
    forward and backward on a training batch, no optimizer step. With activation checkpointing
    the activations are those at its peak (`checkpointed_peak`), as the trainer reports them."""
    from lowbit.memory import checkpointed_peak, measure, measure_activations
    from lowbit.train.tasks import to_device

    task, model, precision = trainer.task, trainer.model, trainer.precision
    batch = to_device(next(task.train_batches), trainer.device)

    def forward():
        with precision.autocast():
            return task.loss(model, batch)[0]

    with checkpointed_peak(model):
        saved = measure_activations(model, forward, backward=True)
    precision.backward(forward())
    states = measure(model, trainer.optimizer, precision)
    trainer.optimizer.zero_grad(set_to_none=True)
    states.activations, states.temporaries = saved.activations, saved.temporaries
    states.logits_gradient = saved.logits_gradient
    states.backward_workspace = saved.backward_workspace
    return {
        "bytes": {k: v for k, v in states.as_dict().items() if k != "notes"},
        "bytes_per_param": states.per_param(),
        "num_params": states.num_params,
    }


def _per_label(trainer) -> tuple[dict | None, bool]:
    """Validation accuracy of every true label (token or image class), over the whole split, and
    whether the outputs were not finite. Counts are None for a task that does not predict, and
    where some output was NaN or inf (fp16 that skipped its overflowing steps finishes so): the
    argmax of a NaN row is the first label, so its counts put that label at 100% and every other
    at 0, which the report read as what the recipe forgets (`_label_counts`)."""
    task = trainer.task
    if not hasattr(task, "predict"):
        return None, False
    loss, labels, preds = task.predict(trainer.model, trainer.precision, "validation", None)
    if not math.isfinite(loss):  # the summed loss of the split: NaN or inf where any output was
        return None, True
    labels, preds = labels.flatten(), preds.flatten()
    keep = labels >= 0  # token classification marks skipped positions with -100
    labels, preds = labels[keep], preds[keep]
    names = getattr(task, "id2label", None)
    out = {}
    for label in sorted(set(labels.tolist())):
        mask = labels == label
        name = names[label] if names else str(label)
        out[name] = {"correct": int((preds[mask] == label).sum()), "total": int(mask.sum())}
    return out, False


def _layers(trainer) -> dict:
    """How many of the model's GEMM layers the recipe put in its own formats (`convert`), and how
    many of them a CPU emulated (0 on a GPU), whose throughput is the emulation's."""
    from lowbit.cpu import emulated_layers

    report = trainer.precision.conversion_report
    on_cpu = trainer.device.type == "cpu"
    return {
        "converted": len(report.converted),
        "total": len(report.converted) + len(report.kept),
        "kept_every_layer": trainer.precision.keeps_every_layer,
        "cpu_emulated": len(emulated_layers(trainer.model)) if on_cpu else 0,
    }


def _prepare(study: Study, recipe: str, seed: int) -> tuple:
    """One run as this invocation finds it: its config, the config it trains with, its record
    when it is finished and reusable, and whether it resumes. A run folder that holds a run of
    other settings, or one trained on another device, is refused (`UsageError`)."""
    from lowbit.train import checkpoint
    from lowbit.train.config import read, read_run_info, resolve, with_recorded_data
    from lowbit.train.trainer import resolve_device

    config = resolve(run_config(study, recipe, seed))
    run_dir = Path(config.out)
    device = device_of(resolve_device(config.device))
    record = load_record(run_dir, config)
    if record is not None:
        _check_device(run_dir, "a finished", _recorded_device(record), device)
        return config, config, record, False
    resume = (run_dir / "config.yaml").is_file() and checkpoint.latest(run_dir) is not None
    # A relative --data path is resumed as the absolute one the run recorded (run.json), as
    # `lowbit train --resume` does: the checkpoint's is compared so, and a resumed run's
    # config.yaml holds it; the record keeps the study's own, which later invocations compare.
    trained = with_recorded_data(run_dir, config) if resume else config
    if resume:
        saved = with_recorded_data(run_dir, read(run_dir))
        changed = _changed_settings(saved.to_dict(), trained.to_dict())
        if changed:
            raise UsageError(
                f"{run_dir}: holds an unfinished run with other settings ({changed}); fix: "
                "--overwrite to retrain, or another --out"
            )
        # a load file from before session 26 does not say: run.json names the device type
        load = _read_load(run_dir)
        recorded = load.get("device")
        recorded = recorded or read_run_info(run_dir).get("device", "").partition(":")[0]
        _check_device(run_dir, "an unfinished", recorded or None, device)
        _check_same_model(run_dir, "an unfinished", load.get("model_fingerprint"), config)
    return config, trained, None, resume


def reusable_record(study: Study, recipe: str, seed: int) -> dict | None:
    """The record of the run when it is finished and is reused as it is, else None (it trains or
    resumes); a run folder that can be neither is refused (`_prepare`)."""
    return _prepare(study, recipe, seed)[2]


def device_of(device: torch.device) -> str:
    """What a run's throughput and peak memory are measured on: ``cpu``, or ``cuda`` with the
    GPU's name (another GPU times the same run differently)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def _recorded_device(record: dict) -> str | None:
    """The device a finished run's record names (`device_of`). A record from before session 26
    tells the device type alone, by its peak memory's kind; a diverged one of then, nothing."""
    if "device" in record:
        return record["device"]
    kinds = {"cuda max allocated": "cuda", "tensor accounting": "cpu"}
    return kinds.get(record.get("peak_memory_kind"))


def _check_device(run_dir: Path, state: str, recorded: str | None, device: str) -> None:
    """Refuse to reuse or resume a run on another device than it trained on. The losses differ
    a little (other kernels round in another order), and its throughput and peak memory (CUDA's
    allocator against the CPU's tensor accounting) would sit in one table with the study's other
    runs as if measured alike; a resumed run's throughput would count the steps of both parts.
    ``recorded``: None when unknown, a bare device type when the record names no GPU (then the
    type must match)."""
    if recorded is None or recorded in (device, device.partition(" ")[0]):
        return
    recorded_type = recorded.partition(" ")[0]
    fix = (
        f"--device {recorded_type} as before"
        if recorded_type != device.partition(" ")[0]
        else f"continue the study on {recorded}"
    )
    raise UsageError(
        f"{run_dir}: holds {state} run trained on {recorded}, now {device}, whose speed and "
        f"memory would not compare with the study's; fix: {fix}, or another --out"
    )


def run_one(
    study: Study,
    recipe: str,
    seed: int,
    quiet: bool = True,
    jobs: int = 1,
    on_step=None,
    trainer=None,
) -> dict:
    """Train (or reuse, or resume) one run and return its record (``--overwrite`` cleared the
    study's runs before, `clear_runs`). ``jobs``: up to how many runs
    train at once on this machine beside this one (recorded: its throughput is measured under that
    load, `speed_load`; for a resumed run the largest of its parts', `_record_load`), as are the
    PyTorch threads it trains on (`speed_threads`). ``on_step``: `Trainer.fit`'s, called with the
    trainer after each step (a --jobs worker stops its run there when another run failed).
    ``trainer``: the run's, set up already (`_set_up_first_new_run`)."""
    from lowbit.train import NonFiniteLoss

    config, trained, record, resume = _prepare(study, recipe, seed)
    if record is not None:
        return {**record, "reused": True}
    run_dir = Path(config.out)
    if trainer is None:
        trainer = _trainer(study, recipe, seed, trained, quiet, resume)
    device = device_of(trainer.device)
    model = _model_now(config.task, config.model)  # what the run trains from (`_prepare` checked)
    jobs, threads = _record_load(run_dir, jobs, torch.get_num_threads(), resume, device, model)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    try:
        result = trainer.fit(resume=resume, overwrite=not resume, on_step=on_step)
    except NonFiniteLoss as error:
        record = _diverged(config, recipe, seed, trainer, str(error), jobs, threads)
        record["model_fingerprint"] = model
        _write_record(run_dir, record)
        return {**record, "reused": False}
    if result.status != "completed":  # stopped by a signal: the command's line names it
        raise Terminated if result.stop_signal == signal.SIGTERM else KeyboardInterrupt
    memory = _memory(trainer)
    per_label, non_finite_outputs = _per_label(trainer)
    peak = torch.cuda.max_memory_allocated(trainer.device) if cuda else memory["bytes"]["total"]
    record = {
        "recipe": recipe,
        "seed": seed,
        "config": config.to_dict(),
        "steps": result.steps,
        "train_loss": result.train_loss,
        "start_metrics": result.start_metrics,
        "final_metrics": result.final_metrics,
        "throughput": result.throughput,
        "unit": result.unit,
        "jobs": jobs,
        "threads": threads,
        "step_time": result.step_time,
        "wall_time": result.wall_time,
        "skipped_steps": result.skipped_steps,
        "loss_scale": result.loss_scale,
        "memory": memory,
        "data_fingerprint": trainer.task.fingerprint,
        "model_fingerprint": model,
        "device": device,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max allocated" if cuda else "tensor accounting",
        "per_label": per_label,
        "non_finite_outputs": non_finite_outputs,
        "layers": _layers(trainer),
        "resumed": resume,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _write_record(run_dir, record)
    return {**record, "reused": False}


def _trainer(study: Study, recipe: str, seed: int, config, quiet: bool, resume: bool):
    """The `Trainer` of one run of ``study`` (``config``: as `_prepare` gives it), set up: its
    data read, its model built and converted."""
    from lowbit.train.trainer import Trainer

    # the emulation warning is the same for every seed of a recipe: said for its first one only,
    # and transformers' report of the --model folder's load for the study's first run only
    first_run = (recipe, seed) == (study.recipes[0], study.seeds[0])
    # the digits CNN is no transformers model: importing transformers to quiet it cost each of
    # its runs in a fresh process (a --jobs worker's) ~0.6 s of CPU
    with _transformers_warnings(first_run or config.task == "image-classification"):
        trainer = Trainer(config, quiet=quiet, warn_emulation=seed == study.seeds[0], resume=resume)
    trainer.sample = False  # a sample text per run is slow and not compared
    trainer.warn_warmup = first_run  # the study's runs are as long: once, not once per run
    trainer.run_name = f"{study.out.name}: {recipe} seed {seed}"  # as its stop says it
    return trainer


def _set_up_first_new_run(study: Study, overwrite: bool, quiet: bool, jobs: int):
    """Check the first run that this invocation trains, where it is a new one (not resumed),
    before the study writes anything: a bad input that only a run's set-up finds (a --data
    table, a path with nothing at it, a --seq-len past the model's positions) was refused after
    the study's compare.json was written, over an earlier study's with --overwrite, whose runs
    were cleared too. None where the first run to train resumes (its settings are the study's
    already) or none trains.

    With ``jobs`` 1 the run is set up here, as this process trains it next (every run before it
    is reused): ``((recipe, seed), trainer, seconds)``, the seconds its set-up took (the run's
    "trained in" counts them). With --jobs a worker sets the run up in its own process, and a
    trainer built here as a check would be thrown away (seconds, and its model's memory held for
    the whole study): its inputs are checked without a model (`check_inputs`) and None returned.
    What that check leaves to the run's set-up (data shorter than one window, which needs the
    run's tokenizer; a --model folder's weights; the model's memory) a worker refuses, after the
    study's compare.json is written and, with --overwrite, its runs cleared."""
    from lowbit.train.config import resolve
    from lowbit.train.tasks import check_inputs

    for recipe in study.recipes:
        for seed in study.seeds:
            if overwrite:  # every run is retrained (`clear_runs`)
                config, resume = resolve(run_config(study, recipe, seed)), False
            else:
                _, config, record, resume = _prepare(study, recipe, seed)
                if record is not None:
                    continue
            if resume:
                return None
            if jobs > 1:
                check_inputs(config, resume=False)
                return None
            start = time.perf_counter()
            trainer = _trainer(study, recipe, seed, config, quiet, False)
            return (recipe, seed), trainer, time.perf_counter() - start
    return None


@contextlib.contextmanager
def _transformers_warnings(on: bool):
    """transformers' warnings on (as they are) or off within. Every run of a study loads the same
    --model folder, and transformers' load report ("classifier.weight | MISSING ... newly
    initialized", a fine-tuning head drawn afresh) is a dozen lines each time: a study says it
    once, as `lowbit train` does (a token classifier's load says only what is unexpected in it,
    `lowbit.models.token_classifier`)."""
    if on:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _record_load(
    run_dir: Path, jobs: int, threads: int, resume: bool, device: str, model: dict | None
) -> tuple[int, list[int]]:
    """The largest ``jobs`` the run's parts trained under and the thread counts they trained on
    (smallest first), this one's included, kept in the run folder (`LOAD`) for the invocation
    that finishes the run and writes its record, with the ``device`` they train on (a later part
    must train on it too, `_check_device`) and the --model folder's fingerprint (a resumed run
    continues the weights it loaded as it started, `_check_same_model`). A resumed run's
    throughput counts the steps of every part (the checkpoint holds their tokens and seconds):
    recorded as the last part's ``jobs`` alone, a run begun under --jobs 2 and finished under
    --jobs 1 read as trained alone, and a study of such runs had no word in its report about the
    shared load; so with threads, a run begun on 4 threads and resumed on 1. A load file from
    before session 25 has no threads: the earlier parts' are unknown and left out."""
    thread_counts = {threads}
    if resume:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            saved = _read_load(run_dir)
            jobs = max(jobs, int(saved.get("jobs", jobs)))
            thread_counts.update(int(count) for count in saved.get("threads", []))
    RunLock(run_dir).refuse_held()  # a run another process has begun since `check_live`
    run_dir.mkdir(parents=True, exist_ok=True)
    thread_counts = sorted(thread_counts)
    load = {"jobs": jobs, "threads": thread_counts, "device": device, "model_fingerprint": model}
    write_atomically(run_dir / LOAD, json.dumps(load) + "\n")
    return jobs, thread_counts


def _read_load(run_dir: Path) -> dict:
    """The run folder's load file (`_record_load`); empty where there is none or it is
    unreadable."""
    try:
        saved = json.loads((run_dir / LOAD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _write_record(run_dir: Path, record: dict) -> None:
    write_atomically(run_dir / RECORD, json.dumps(_jsonable(record), indent=1) + "\n")


def _diverged(config, recipe, seed, trainer, error: str, jobs: int, threads: list[int]) -> dict:
    """The record of a run stopped by a non-finite loss: no final loss, no memory measurement;
    its throughput, averaged into its recipe's, under the load of ``jobs`` (`speed_load`) on
    ``threads`` (`speed_threads`)."""
    return {
        "recipe": recipe,
        "seed": seed,
        "config": config.to_dict(),
        "steps": trainer.step_idx,
        "train_loss": math.nan,
        "start_metrics": trainer.start_metrics,
        "final_metrics": {},
        "throughput": trainer.counted / max(trainer.step_seconds, 1e-9),
        "unit": trainer.task.unit,
        "jobs": jobs,
        "threads": threads,
        "step_time": trainer.step_seconds / max(1, trainer.step_idx),
        "skipped_steps": int(trainer.precision.skipped_steps),
        "loss_scale": float(trainer.precision.loss_scale),
        "memory": None,
        "data_fingerprint": trainer.task.fingerprint,
        "device": device_of(trainer.device),
        "peak_memory_bytes": math.nan,
        "peak_memory_kind": "",
        "per_label": None,
        "layers": _layers(trainer),
        "resumed": False,
        "diverged": error,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# How `lowbit.train.logging` writes a non-finite number into metrics.jsonl (``str(value)``).
NON_FINITE_SPELLINGS = ("nan", "inf", "-inf")


def read_curves(run_dir: Path) -> dict:
    """Train loss per step and validation loss per evaluation, from the run's ``metrics.jsonl``.

    A non-finite loss is kept as a float NaN or inf (the log spells it ``"nan"``, JSON has no
    such number): left out, an evaluation whose loss was NaN vanished from the curves, the plots
    and the gap table as if it had never run."""
    train, val = {}, {}
    path = Path(run_dir) / METRICS
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        loss = row.get("loss")
        if loss in NON_FINITE_SPELLINGS:
            loss = float(loss)
        if not isinstance(loss, int | float):
            continue
        (train if row.get("split") == "train" else val)[int(row["step"])] = float(loss)
    return {
        "train": sorted(train.items()),
        "validation": sorted(val.items()),
    }


# ----------------------------------------------------------------------------------- statistics


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds; NaN when a seed has no finite value (a diverged run): the
    mean of the other seeds would read as the recipe's, with a spread it does not have."""
    values = [_finite(v) for v in values]
    if not values or not all(map(math.isfinite, values)):
        return math.nan, math.nan
    return statistics.fmean(values), _sample_std(values)


def _sample_std(values: list[float]) -> float:
    """The sample std over seeds; NaN (null in results.json) for one seed, whose spread is not
    measured: 0 there read as seeds that agree exactly, and a script judging ``|gap| > 2 x
    spread`` from results.json called every gap of a one-seed study significant."""
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _gap(values: list[float], base: list[float]) -> tuple[float, float]:
    """Paired gap in percent of the baseline's mean, and its spread (std of the differences);
    NaN when a seed of either side has no finite value (`_mean_std`), or the baseline's mean is
    0 (a model that fits its data exactly, train loss 0.0: no percent of it is defined, where
    the division raised ZeroDivisionError and the study ended without a report)."""
    pairs = list(zip(values, base))
    if not pairs or not all(math.isfinite(v) and math.isfinite(b) for v, b in pairs):
        return math.nan, math.nan
    base_mean = statistics.fmean(b for _, b in pairs)
    if base_mean == 0:
        return math.nan, math.nan
    diffs = [100 * (v - b) / base_mean for v, b in pairs]
    return statistics.fmean(diffs), _sample_std(diffs)


def verdict(gap: float, spread: float, target: Target, seeds: int) -> tuple[str, bool | None]:
    """A one-line verdict and whether the recipe meets its target (``None``: cannot tell)."""
    if not math.isfinite(gap):
        return "FAIL: no finite validation loss (the run diverged)", False
    noise = 2 * spread if seeds > 1 else 0.0
    digits = verdict_digits(gap, noise, target.pct, seeds)
    if seeds > 1:
        diff = "significant" if abs(gap) > noise else "not significant"
        stats = f"gap {gap:+.{digits}f}%, 2x seed spread {noise:.{digits}f}%, difference {diff}"
    else:
        stats = f"gap {gap:+.{digits}f}%; 1 seed: no spread, not a significance test"
    if target.expect_worse:
        if gap > target.pct and gap - target.pct > noise:
            return f"as expected: measurably worse than {target.pct:g}% ({stats})", True
        return f"MISSES the expectation: not measurably worse than {target.pct:g}% ({stats})", False
    if gap <= target.pct:
        if seeds > 1 and gap + noise > target.pct:  # the seeds cannot rule out a miss
            return (
                f"PASS (unresolved): within {target.pct:g}% of the baseline, but the seed spread "
                f"is larger than the margin ({stats})",
                True,
            )
        return f"PASS: within {target.pct:g}% of the baseline ({stats})", True
    if gap - target.pct > noise:
        return f"FAIL: outside {target.pct:g}% of the baseline ({stats})", False
    return f"INCONCLUSIVE: above {target.pct:g}% but within 2x the seed spread ({stats})", None


def verdict_digits(gap: float, noise: float, pct: float, seeds: int) -> int:
    """Decimals (3 to 6) at which the gap and twice its spread, as the verdict prints them, give
    the comparisons the verdict made the answers it got. At 3 always, a gap a hair above the
    target read "FAIL: outside 0.5% of the baseline (gap +0.500%, ...)", and one a hair above
    twice its spread "gap +0.003%, 2x seed spread 0.003%, difference significant"; and so that
    the spread itself shows as nonzero (`spread_digits`)."""

    def comparisons(g: float, n: float, clean) -> tuple[bool, ...]:
        above = (clean(g - pct) > n, g <= pct)  # outside the target by more than 2x spread
        if seeds == 1:  # no spread: the gap against the target alone
            return above
        return (*above, abs(g) > n, clean(g + n) > pct)  # significant; unresolved

    exact = comparisons(gap, noise, lambda x: x)
    digits = next(
        (
            digits
            for digits in range(3, 7)
            # a printed sum has no binary noise: 0.1 + 0.2 is above 0.3 in floating point
            if comparisons(round(gap, digits), round(noise, digits), lambda x: round(x, 9)) == exact
        ),
        3,  # closer than 1e-6 %, or apart by binary noise alone: equal to any reader
    )
    return spread_digits(noise / 2, digits)


def spread_digits(spread: float, digits: int = 3) -> int:
    """``digits``, or more (up to 6) where a nonzero seed spread would print as zero: the report's
    "+0.003% ± 0.000" read as seeds that agree exactly, beside a verdict that called the
    difference significant against a spread it printed as 0.001%."""
    while digits < 6 and spread and math.isfinite(spread) and round(spread, digits) == 0:
        digits += 1
    return digits


def _stalled_seeds(runs: list[dict]) -> list[int]:
    """Seeds whose run skipped every one of its steps (non-finite gradients at every step, as
    fp16 at too high a --loss-scale has): its weights never changed, and its final loss, the
    untrained model's, beside a baseline that hardly moved (a low --lr, a few steps) read PASS."""
    return [r["seed"] for r in runs if r.get("steps") and r.get("skipped_steps", 0) >= r["steps"]]


def _worsened_seeds(runs: list[dict], pct: float) -> list[int]:
    """Seeds whose final validation loss is above the one their run started from (its model
    before the first step, `start_metrics`) by more than ``pct`` percent of it: training made
    the model worse, as a --lr far too high does, whose loss grows for many steps, finite, before
    it overflows if it ever does. Judged against such a baseline, fp8 read "PASS (unresolved)"
    (fp32 from 5.5 to 920, fp8 to 590: "gap -35.9%").

    ``pct`` is the study's tightest target (`_tightest_target`): a rise within it is one the
    study calls no difference. Any rise at all (``>``) caught a fine-tuned, already trained
    model whose loss wandered 2.9090 -> 2.9091 (+0.003%) and left every recipe without a
    verdict, its fix ("a lower --lr") no help. Each seed is judged alone, not against the seeds'
    spread: its start and end are evaluated on the same validation batches, a paired difference,
    and a spread test hides one seed of three going 5.5 -> 1157 beside two that fell (the spread
    it makes is as wide as its rise)."""
    return [
        r["seed"]
        for r in runs
        # NaN (a record without start_metrics): False
        if final_loss(r) > _finite(r.get("start_metrics", {}).get("loss")) * (1 + pct / 100)
    ]


def tightest_target(targets) -> float | None:
    """The smallest tolerance, in percent, of ``targets`` (`Target`) that claim parity, None where
    none does: a target expected to be worse (``bf16-pure``) is a floor the gap must exceed, not
    a margin within which the study calls a difference none. One rule for the study's judging of
    its baseline (`_tightest_target`) and the report's trend line (`markdown.trend_line`)."""
    return min((t.pct for t in targets if not t.expect_worse), default=None)


def _tightest_target(study: Study) -> float:
    """`tightest_target` of the recipes the study judges, or its --tolerance where none claims
    parity (the baseline alone, or every recipe expected to be worse)."""
    pct = tightest_target(study.target(name) for name in study.recipes if name != study.baseline)
    return study.tolerance if pct is None else pct


def _rise(runs: list[dict], seeds: list[int]) -> str:
    """``"5.5343 -> 1156.6388, +20799.0%"``: the first of ``seeds``' validation loss at its start
    and end, and the rise in percent of the start."""
    run = next(r for r in runs if r["seed"] == seeds[0])
    start, end = run["start_metrics"]["loss"], final_loss(run)
    return f"{start:.4f} -> {end:.4f}, {100 * (end - start) / start:+.1f}%"


def _judge(study: Study, recipe: str, runs, base_runs, gap: float, spread: float):
    """The verdict line and whether ``recipe`` meets its target (None: no verdict), where a run of
    it or of the baseline diverged or never updated its weights (`_stalled_seeds`) before the
    gap decides (`verdict`)."""
    baseline = study.baseline
    fix = "a lower --lr" if _without_loss_scaling(recipe) else "a lower --loss-scale or --lr"
    if recipe == baseline:
        if seeds := _non_finite_seeds(runs):
            return (
                f"the baseline diverged (non-finite loss) with {_seeds(seeds)}: no recipe can be "
                "judged against it; fix: a lower --lr or another --baseline"
            ), False
        if seeds := _stalled_seeds(runs):
            return (
                f"the baseline skipped every step (non-finite gradients) with {_seeds(seeds)}, so "
                f"its weights never changed: no recipe can be judged against it; fix: {fix}, or "
                "another --baseline"
            ), False
        if seeds := _worsened_seeds(runs, pct := _tightest_target(study)):
            return (
                f"the baseline's validation loss ended above where it started, by more than the "
                f"tightest target ({pct:g}%), with {_seeds(seeds)} ({_rise(runs, seeds)}): "
                "training made it worse, so no recipe can be judged against it; fix: a lower "
                "--lr, or another --baseline"
            ), False
        return "baseline", True
    if seeds := _non_finite_seeds(runs):
        return f"FAIL: diverged (non-finite loss) with {_seeds(seeds)}", False
    if seeds := _non_finite_seeds(base_runs):
        return (
            f"no verdict: the baseline {baseline} diverged (non-finite loss) with "
            f"{_seeds(seeds)}, so there is no gap to judge"
        ), None
    if seeds := _stalled_seeds(base_runs):
        return (
            f"no verdict: the baseline {baseline} skipped every step with {_seeds(seeds)}, so "
            "there is no gap to judge"
        ), None
    if seeds := _worsened_seeds(base_runs, pct := _tightest_target(study)):
        return (
            f"no verdict: the baseline {baseline}'s validation loss ended above where it started, "
            f"by more than {pct:g}%, with {_seeds(seeds)}, so there is no gap to judge"
        ), None
    if seeds := _stalled_seeds(runs):
        return (
            f"no verdict: skipped every step (non-finite gradients) with {_seeds(seeds)}, so its "
            f"weights never changed and its loss is the untrained model's; fix: {fix}"
        ), None
    if not math.isfinite(gap):  # every loss finite (above): the baseline's mean is 0 (`_gap`)
        return (
            f"no verdict: the baseline {baseline}'s validation loss is 0, so there is no gap in "
            "percent of it to judge (compare the losses themselves)"
        ), None
    return verdict(gap, spread, study.target(recipe), len(runs))


def summarize(study: Study, records: dict) -> dict:
    """The study's results: per recipe means, gaps, verdicts, per-label changes, mean curves."""
    task = study.base["task"]
    metric = TASK_METRIC[task]
    base_runs = records[study.baseline]
    base_val = [final_loss(r) for r in base_runs]
    base_train = [_train_loss(r) for r in base_runs]
    base_tp = _throughput(base_runs)
    rows = {}
    for recipe in study.recipes:
        runs = records[recipe]
        curves = [read_curves(study.run_dir(recipe, r["seed"])) for r in runs]
        val = [final_loss(r) for r in runs]
        train = [_train_loss(r) for r in runs]
        gap, spread = _gap(val, base_val)
        train_gap, train_spread = _gap(train, base_train)
        target = study.target(recipe)
        diverged = _non_finite_seeds(runs)
        line, ok = _judge(study, recipe, runs, base_runs, gap, spread)
        throughput = _throughput(runs)
        metrics = {
            name: _mean_std([_finite(r["final_metrics"].get(name)) for r in runs])
            for name in ("accuracy", "entity_f1", "ppl")
            if any(name in r["final_metrics"] for r in runs)
        }
        base_labels, labels, no_labels = _paired_label_accuracy(base_runs, runs, study.baseline)
        measured = [r for r in runs if r.get("memory")]
        label_change = {
            name: {
                "baseline": base_labels[name],
                "recipe": labels.get(name, math.nan),
                "change_pp": 100 * (labels.get(name, math.nan) - base_labels[name]),
            }
            for name in base_labels
        }
        rows[recipe] = {
            "seeds": [r["seed"] for r in runs],
            "val_loss": _mean_std(val),
            "train_loss": _mean_std(train),
            "val_gap_pct": gap,
            "val_gap_spread_pct": spread,
            "train_gap_pct": train_gap,
            "train_gap_spread_pct": train_spread,
            "metrics": metrics,
            "throughput": throughput,
            "unit": runs[0]["unit"],
            "throughput_ratio": throughput / base_tp,
            "peak_memory_bytes": (
                statistics.fmean(r["peak_memory_bytes"] for r in measured) if measured else math.nan
            ),
            "peak_memory_kind": next((r["peak_memory_kind"] for r in measured), ""),
            "memory_bytes": measured[0]["memory"]["bytes"] if measured else None,
            "bytes_per_param": measured[0]["memory"]["bytes_per_param"] if measured else None,
            "num_params": measured[0]["memory"]["num_params"] if measured else None,
            "diverged": diverged,
            "skipped_steps": _mean_std([r["skipped_steps"] for r in runs]),
            "target": dataclasses.asdict(target),
            "verdict": line,
            "meets_target": ok,
            "per_label": label_change,
            # why the recipe has no per-label change (None: it has one, or the task counts none)
            "per_label_missing": (
                no_labels if recipe != study.baseline and task in LABELLED_TASKS else None
            ),
            "layers": runs[0].get("layers"),  # absent in records from before session 11
            "non_finite_evaluations": _non_finite_evaluations(runs, curves),
            "curves": _mean_curves(curves),
        }
    return {
        "settings": {
            **study.settings(),
            "tolerance": study.tolerance,
            "targets": study.targets,
            "parity_targets": study.parity_targets,  # False: --no-parity-targets
        },
        "speed_load": speed_load(records),
        "speed_threads": speed_threads(records),
        "speed_devices": speed_devices(records),
        "task": task,
        "metric": metric,
        "baseline": study.baseline,
        "baseline_trend": baseline_trend(rows[study.baseline]["curves"]["validation"]),
        "recipes": rows,
        # a diverged run's train_loss null, as in its recipe's row (`_train_loss`)
        "runs": {
            recipe: [
                {
                    k: _train_loss(r) if k == "train_loss" else v
                    for k, v in r.items()
                    if k != "config"
                }
                for r in runs
            ]
            for recipe, runs in records.items()
        },
    }


def speed_load(records: dict) -> list[int]:
    """The ``--jobs`` values the study's runs trained under (a resumed run's: the largest of its
    parts'), smallest first (records from before session 19 do not say: left out). Runs that
    trained several at a time shared the cores, so their throughput is lower than alone, and a
    ratio between runs trained under different loads measures the load as much as the recipe."""
    return sorted({r["jobs"] for runs in records.values() for r in runs if "jobs" in r})


def speed_threads(records: dict) -> list[int]:
    """The PyTorch thread counts the study's runs trained on (every part of a resumed run's),
    smallest first (records from before session 25 do not say: left out). A run's --threads is
    not one of the settings a finished run is reused by (the losses hardly depend on it), so a
    study continued with other --threads, or a recipe added to it later, holds runs timed on
    different thread counts, whose throughput ratios measure the threads as much as the recipe."""
    return sorted({t for runs in records.values() for r in runs for t in r.get("threads", [])})


def speed_devices(records: dict) -> list[str]:
    """The devices the study's runs trained on (`device_of`: ``cpu``, or ``cuda`` with the GPU's
    name; a bare type for a record from before session 26, none for a diverged one of then), in
    order. One study's runs share one (`_check_device`), but its report is read beside other
    studies': a throughput means nothing without the device that measured it."""
    return sorted({d for runs in records.values() for r in runs if (d := _recorded_device(r))})


def baseline_trend(curve: list) -> dict | None:
    """How much the baseline's mean validation loss moved over the last evaluation interval.

    A gap measured while the loss still falls by more than a recipe's target partly measures how
    fast the recipe converges rather than where it ends: a recipe one evaluation interval behind
    fp32 shows a gap of the whole last fall. None without two evaluations after the start.
    """
    points = [(step, loss) for step, loss in curve if step > 0]
    # a non-finite mean (a seed's NaN evaluation, `non_finite_evaluations`) has no trend to tell
    if len(points) < 2 or not all(math.isfinite(loss) for _, loss in points[-2:]):
        return None
    (first_step, first_loss), (last_step, last_loss) = points[-2], points[-1]
    return {
        "from_step": first_step,
        "to_step": last_step,
        "from_loss": first_loss,
        "to_loss": last_loss,
        "change_pct": 100 * (last_loss - first_loss) / first_loss,
    }


def final_loss(record: dict) -> float:
    """A run's final validation loss; NaN where it has none (a diverged run) or it was not finite
    (a reused record: JSON stores NaN as null)."""
    return _finite(record["final_metrics"].get("loss"))


def _train_loss(record: dict) -> float:
    """A run's train loss (the mean of its last steps' finite losses, `lowbit train`'s); NaN for a
    run that diverged (`_non_finite_seeds`), as its validation loss is: the steps left to average
    are those before the divergence, and an fp16-low run whose loss went NaN at step 8 of 20 read
    "train loss 13.4054, train gap -58.425%", better than the fp32 it failed beside."""
    return math.nan if _non_finite_seeds([record]) else _finite(record["train_loss"])


def _non_finite_seeds(runs: list[dict]) -> list[int]:
    """Seeds whose run stopped on a non-finite loss, or ended with a non-finite validation loss
    (a recipe that skips non-finite steps, as fp16's loss scaling does, trains on to the end)."""
    return [r["seed"] for r in runs if r.get("diverged") or not math.isfinite(final_loss(r))]


def _throughput(runs: list[dict]) -> float:
    """Mean throughput over the runs that measured one; NaN where none did. A run stopped by a
    non-finite loss at its first step trained no token in no time, recorded as 0 per second
    (`_diverged`): averaged in, it took a third off the throughput of a recipe with one such seed
    of three, and as the baseline's only runs it made every ratio "nanx"."""
    measured = [tp for r in runs if (tp := _finite(r.get("throughput"))) > 0]
    return statistics.fmean(measured) if measured else math.nan


def _finite(value) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def _label_counts(run: dict) -> dict | None:
    """A run's per-label counts where they are predictions: None for a run stopped by a
    non-finite loss (it counted none) and for one whose validation outputs were NaN or inf
    (`_per_label`), which a record from before session 33 counted as if its argmax were
    predictions; its validation loss, not finite, tells it (`final_loss`)."""
    if run.get("non_finite_outputs") or not math.isfinite(final_loss(run)):
        return None
    return run.get("per_label") or None


def _label_accuracy(counts: list[dict]) -> dict[str, float]:
    """Accuracy per label pooled over seeds (``counts``: one `_label_counts` per seed)."""
    totals: dict[str, list[int]] = {}
    for run in counts:
        for name, c in run.items():
            acc = totals.setdefault(name, [0, 0])
            acc[0] += c["correct"]
            acc[1] += c["total"]
    return {name: c / t for name, (c, t) in totals.items() if t}


def _paired_label_accuracy(
    base_runs: list[dict], runs: list[dict], baseline: str
) -> tuple[dict, dict, str | None]:
    """Per-label accuracy of the baseline and of a recipe, each pooled over the seeds where both
    runs counted them (`_label_counts`): a seed stopped by a non-finite loss has no counts, and
    the baseline pooled over every seed against the recipe's others would read seed-to-seed
    differences as what the recipe forgets. With no such seed, the baseline's over all of its
    counted seeds, none of the recipe's, and why no change is measured, which the report prints:
    a baseline that finished no seed left the section out without a word, and seeds finished by
    each side but none by both read "no seed finished" for a recipe that had."""
    by_seed = {b["seed"]: counts for b in base_runs if (counts := _label_counts(b))}
    counted = {r["seed"]: counts for r in runs if (counts := _label_counts(r))}
    paired = [(by_seed[seed], counts) for seed, counts in counted.items() if seed in by_seed]
    if paired:
        pooled = _label_accuracy([b for b, _ in paired]), _label_accuracy([r for _, r in paired])
        return *pooled, None
    if not by_seed:
        if seeds := _non_finite_output_seeds(base_runs):
            why = (
                f"the baseline {baseline} predicted nothing: its validation outputs were NaN or "
                f"inf with {_seeds(seeds)}"
            )
        else:
            why = f"the baseline {baseline} finished no seed: nothing to compare against"
    elif not counted:
        seeds = _non_finite_output_seeds(runs)
        why = (
            f"no prediction: its validation outputs were NaN or inf with {_seeds(seeds)}"
            if seeds
            else "no seed finished"
        )
    else:
        why = (
            f"no seed finished by both: the baseline {_seeds(sorted(by_seed))}, this recipe "
            f"{_seeds(list(counted))}"
        )
    return _label_accuracy(list(by_seed.values())), {}, why


def _non_finite_output_seeds(runs: list[dict]) -> list[int]:
    """Seeds that trained to the end but whose validation outputs were NaN or inf, so counted no
    prediction per label (`_label_counts`); a seed stopped by a non-finite loss is not one."""
    return [
        r["seed"]
        for r in runs
        if not r.get("diverged")
        and (r.get("non_finite_outputs") or not math.isfinite(final_loss(r)))
    ]


def _seeds(seeds: list[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _non_finite_evaluations(runs: list[dict], curves: list[dict]) -> dict[int, list[int]]:
    """The steps at which each seed's validation loss was not finite, for the seeds that had any
    (their recipe's mean curve is NaN there: the report says whose and where)."""
    out = {}
    for run, curve in zip(runs, curves):
        steps = [step for step, loss in curve["validation"] if not math.isfinite(loss)]
        if steps:
            out[run["seed"]] = steps
    return out


def _mean_curves(curves: list[dict]) -> dict:
    """Mean over seeds at the steps every seed has."""
    out = {}
    for split in ("train", "validation"):
        maps = [dict(c[split]) for c in curves]
        steps = sorted(set.intersection(*(set(m) for m in maps))) if maps else []
        out[split] = [[s, statistics.fmean(m[s] for m in maps)] for s in steps]
    return out


# ----------------------------------------------------------------------------------- the study


@dataclass
class CompareResult:
    study: Study
    results: dict
    report_dir: Path
    trained: list[tuple[str, int]]
    reused: list[tuple[str, int]]


def check_out(study: Study, overwrite: bool) -> None:
    """Refuse an output folder that holds a different study (unless ``overwrite``), and an
    output path that is a file or lies under one (never replaced, even with ``overwrite``)."""
    blocking = file_in_the_way(study.out)
    if blocking is not None:
        raise UsageError(
            f"--out {study.out}: {blocking} is a file, not a folder; fix: choose another --out"
        )
    check_writable(study.out)  # /proc/x: a traceback where the folder was made
    # found only when the study writes there, the report's after every run has trained
    report = study.out / REPORT_DIR
    for path in (study.out / "runs", report):
        if path.exists() and not path.is_dir():
            raise UsageError(
                f"--out {study.out}: {path} is a file where the study writes a folder; fix: "
                "move it away, or choose another --out"
            )
    for path in (report / name for name in REPORT_FILES):
        if path.is_dir():
            raise UsageError(
                f"--out {study.out}: {path} is a folder where the report writes a file; fix: "
                "move it away, or choose another --out"
            )
    if (study.out / SETTINGS).is_file() and not overwrite:
        changed = _saved_changes(study.out, study.base)
        if changed and not _holds_only_settings(study.out):
            raise UsageError(
                f"{study.out}: holds a compare study with other settings ({changed}); fix: "
                "another --out to keep it, or --overwrite to replace its runs"
            )
    elif study.out.is_dir() and not overwrite:
        ours = ("runs", REPORT_DIR)
        # a study killed while writing its settings the first time leaves only their temporary
        # file (`write_atomically`), which is this study's own, not another program's
        foreign = sorted(
            p.name
            for p in study.out.iterdir()
            if p.name not in ours and not is_write_leftover(p.name, SETTINGS)
        )
        if foreign:
            raise UsageError(
                f"{study.out}: folder holds {foreign[0]!r}, not a compare study; fix: choose "
                "another --out"
            )


def check_runs(study: Study) -> None:
    """Refuse (`UsageError`) a run folder of ``study`` that holds a run it can neither reuse nor
    resume (other settings, another device: `_prepare`) before any run trains: found as its turn
    came, it was found after the runs listed before it had trained (a recipe added first to a
    study continued on a GPU)."""
    for recipe in study.recipes:
        for seed in study.seeds:
            _prepare(study, recipe, seed)


def check_live(study: Study) -> None:
    """Refuse a study one of whose runs another process is training (a second `lowbit compare`
    of a study still running): its trainer's lock refused it only after this invocation had
    written the run's load file, and with --overwrite cleared the live run's files."""
    for recipe in study.recipes:
        for seed in study.seeds:
            RunLock(study.run_dir(recipe, seed)).refuse_held()


def _saved_changes(out: Path, base: dict) -> str:
    """The settings in which the study saved in ``out`` (its `SETTINGS` file) differs from one of
    base settings ``base`` (`_changed_settings`; empty when its runs are this study's).

    The runs depend on the base settings only: a study with another baseline or another subset of
    recipes (parity.py's parallel parts) reuses them and rewrites the report. The loss-scale
    settings reach the fp16 recipes' runs alone (`_recipe_settings`), whose own settings `run_one`
    compares: fp32 against fp16-mixed at another loss scale reuses fp32's runs."""
    try:
        saved = json.loads((out / SETTINGS).read_text(encoding="utf-8"))
    except ValueError:
        saved = {}
    return _changed_settings(_without_loss_scale(saved.get("base", {})), _without_loss_scale(base))


def _without_loss_scale(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _LOSS_SCALE_SETTINGS}


def _holds_only_settings(out: Path) -> bool:
    """Whether a compare folder holds nothing but a study's settings (and empty folders): that
    study stopped before its first run wrote a file (killed, or refused by a lowbit from before
    session 36, which set the first run up only after writing them: a --data path that does not
    exist), so the corrected command, whose settings differ, replaces nothing in taking the
    folder over."""
    settings = (out / SETTINGS, *(p for p in out.iterdir() if is_write_leftover(p.name, SETTINGS)))
    return all(path.is_dir() or path in settings for path in out.rglob("*"))


class InterruptedBeforeRuns(KeyboardInterrupt):
    """A Ctrl-C that stopped `compare` before it trained a run and, with --overwrite, before it
    had cleared the earlier study's runs (`clear_runs`, most often during the first run's set-up,
    `_set_up_first_new_run`): the same command goes on. The command without --overwrite, which
    goes on from an interrupted run once the runs were cleared, would here reuse the earlier
    study's runs as this one's, or refuse its other settings. ``written``: whether this
    invocation had begun to write the study's folder (its settings; a part of the runs cleared),
    else nothing was changed."""

    def __init__(self, written: bool):
        super().__init__(written)
        self.written = written


def clear_runs(study: Study) -> None:
    """Remove every run of ``study`` (its record and the files a run writes), as ``--overwrite``
    does before it trains any: an invocation interrupted halfway then leaves the runs it retrained
    and the checkpoint of the one it stopped in, which the command without --overwrite reuses and
    resumes. Cleared one by one as each was reached, the runs after the interrupted one kept their
    old records, which that command reused as if retrained, or refused as other settings with
    --overwrite as the fix, which retrained everything again."""
    from lowbit.train.trainer import clear_run_dir

    for recipe in study.recipes:
        for seed in study.seeds:
            run_dir = study.run_dir(recipe, seed)
            (run_dir / RECORD).unlink(missing_ok=True)
            (run_dir / LOAD).unlink(missing_ok=True)
            clear_run_dir(run_dir)


def compare(
    study: Study, overwrite=False, quiet=True, plots=True, log=print, jobs: int = 1, threads=None
) -> CompareResult:
    """Train every (recipe, seed) of ``study`` (reusing finished runs), write the report. With
    ``jobs`` > 1 the runs train that many at a time in worker processes of ``threads`` PyTorch
    threads each (default: the cores shared out; `lowbit.report.parallel`), which together with
    this process say each warning once (`warnings_once`)."""
    if jobs > 1:
        from lowbit.report.parallel import warnings_once

        with warnings_once():
            return _compare(study, overwrite, quiet, plots, log, jobs, threads)
    return _compare(study, overwrite, quiet, plots, log, jobs, threads)


def _compare(study: Study, overwrite, quiet, plots, log, jobs: int, threads) -> CompareResult:
    from lowbit.report.html import write_html
    from lowbit.report.markdown import write_markdown
    from lowbit.report.plots import write_plots

    _data_now.cache_clear()  # read afresh: the files may have changed since the last study
    _model_now.cache_clear()
    written = False
    try:
        check_out(study, overwrite)
        check_live(study)
        if not overwrite:  # before anything is written: a refused command leaves it as it was
            check_runs(study)
        set_up = _set_up_first_new_run(study, overwrite, quiet, jobs)
        say_held_notes()  # a --model folder's sequence length (`resolve`), once for the study
        written = True
        study.out.mkdir(parents=True, exist_ok=True)
        # Written whole or not at all: parallel parts of one study (parity.py) write it at once.
        write_atomically(study.out / SETTINGS, json.dumps(study.settings(), indent=1) + "\n")
        if overwrite:
            clear_runs(study)  # from here on a run is retrained because it holds nothing
    except KeyboardInterrupt as interrupt:
        raise InterruptedBeforeRuns(written) from interrupt
    in_workers = set()
    if jobs > 1:
        from lowbit.report.parallel import train_runs

        # the data read here first: its warnings said once, before the workers start
        _data_now(study.base["task"], study.base["data"], study.base["text_field"])
        runs = [(study, recipe, seed) for recipe in study.recipes for seed in study.seeds]
        # fewer runs than --jobs: the cores are theirs to share; finished runs are reused
        # without a worker (`train_runs`)
        in_workers = train_runs(runs, jobs, threads, log)
    records: dict[str, list[dict]] = {}
    trained, reused = [], []
    total = len(study.recipes) * len(study.seeds)
    for recipe in study.recipes:
        records[recipe] = []
        for seed in study.seeds:
            t0 = time.perf_counter()
            trainer = None
            if set_up is not None and set_up[0] == (recipe, seed):
                (_, trainer, seconds), set_up = set_up, None
                t0 -= seconds  # its set-up, before the study wrote anything, is its time too
            record = run_one(study, recipe, seed, quiet=quiet, trainer=trainer)
            if (study.out, recipe, seed) in in_workers:
                record = {**record, "reused": False}
            records[recipe].append(record)
            (reused if record["reused"] else trained).append((recipe, seed))
            if jobs > 1:
                continue  # `train_runs` logged each run as its worker finished it
            how = run_how(record)
            if how != "reused":
                elapsed = f"trained in {time.perf_counter() - t0:.0f}s"
                how = f"resumed, {elapsed}" if how == "resumed" else elapsed
            log(
                f"[{len(trained) + len(reused)}/{total}] {recipe} seed {seed}: validation loss "
                f"{final_loss(record):.4f} ({how})"
            )
    results = summarize(study, records)
    report_dir = study.out / REPORT_DIR
    report_dir.mkdir(exist_ok=True)
    images = write_plots(results, report_dir) if plots else {}
    # a plot of an earlier invocation that this one did not draw (--no-plots, no per-label map)
    # would sit in the report folder as if it showed this study
    for name in set(PLOT_FILES) - {path.name for path in images.values()}:
        (report_dir / name).unlink(missing_ok=True)
    results["images"] = {k: p.name for k, p in images.items()}
    # whole or not at all: parallel parts of one study (parity.py) may finish at once
    write_atomically(report_dir / "results.json", json.dumps(_jsonable(results), indent=1) + "\n")
    write_markdown(results, report_dir / "report.md")
    write_html(results, report_dir / "report.html", images)
    return CompareResult(study, results, report_dir, trained, reused)


def run_how(record: dict) -> str:
    """How this invocation got a run, as its progress line says: "reused", "resumed" (from the
    checkpoint an interrupted invocation left: after a Ctrl-C, every rerun run read "trained",
    as if begun again) or "trained"."""
    if record["reused"]:
        return "reused"
    return "resumed" if record.get("resumed") else "trained"


def _jsonable(obj):
    """NaN/inf -> null (JSON has neither); tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
