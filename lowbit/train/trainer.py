"""The training loop, written against the `lowbit.Precision` hooks (it never tests a recipe name).

`train(config)` runs (or resumes) a run and returns a `RunResult`; `Trainer.step()` is one optimizer
step (``grad_accum`` micro-batches), the unit the overhead benchmark times.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import random
import resource
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lowbit.cpu import bf16_gemm_warning, emulated_layers
from lowbit.diagnostics.monitor import build_monitor
from lowbit.errors import (
    RunNotWritten,
    UsageError,
    check_writable,
    is_interrupt,
    note_stopping,
    raise_terminated,
    say_held_notes,
    warnings_as_they_come,
    warnings_held,
)
from lowbit.nn.convert import lowbit_layers
from lowbit.precision.scaler import SMALLEST_SCALE
from lowbit.recipes import same_recipe
from lowbit.recipes.recipe import dtype_name
from lowbit.train import checkpoint
from lowbit.train.config import (
    RUN_INFO,
    TrainConfig,
    flag_of,
    ignored_settings,
    lr_at,
    read,
    read_run_info,
    recipe_of,
    resolve,
    spelled_none,
    warn_long_warmup,
    with_recorded_data,
    write,
    write_atomically,
)
from lowbit.train.generate import visible
from lowbit.train.logging import MetricsLogger, NullLogger
from lowbit.train.runstate import RunLock, process_fields, resume_command, resumed_text
from lowbit.train.tasks import build_task, metric_text, to_device

SAMPLE_TOKENS = 160  # the length of the sample text shown at the end of a causal-lm run
TRAIN_LOSS_STEPS = 20  # the last steps whose mean loss is a run's train loss (summary, report)
# The steps in a row with a non-finite loss after which a loss-scaled run stops as diverged. Loss
# scaling cures gradients that overflow, not a forward pass that does: the loss is inf or NaN
# before the scale multiplies it, and the step it skips leaves the weights as they were. A bad
# batch passes with the next one; weights that give no finite loss give none on any batch, and
# the run skipped every step to its end, trained nothing and said "completed". Eight different
# batches in a row, each non-finite on the same weights, is no transient (one, or several apart,
# are still skipped). Each skip halves the dynamic scale: 8 take 2^16 to 2^8, far above its floor
# 2^-126 (~142 overflows, the stop for gradients that overflow at every scale), and 8 skips
# leave a scale that grows back as after any 8 overflows.
NONFINITE_LOSSES_IN_ROW = 8
RUN_FILES = ("config.yaml", RUN_INFO, "metrics.jsonl", "vocab.json", "labels.json")
RUN_FOLDERS = ("checkpoints", "tensorboard", "tokenizer", "wandb")
# Settings a resumed run may change without changing what it computes up to the checkpoint.
RESUMABLE_CHANGES = {
    "steps",
    "epochs",
    "eval_interval",
    "save_interval",
    "keep_last",
    "out",
    "device",
    "wandb",
    "eval_batches",
    "nproc",  # multi-process checkpoints reshard to any number of processes
    "stats_interval",
    "activation_checkpointing",  # recomputes the same forward: the same numbers either way
}


class NonFiniteLoss(RuntimeError):
    """Training produced a non-finite loss or gradient under a recipe that cannot skip the step, or
    a loss-scaled run's loss was non-finite `NONFINITE_LOSSES_IN_ROW` steps in a row."""


# The errors of a write that the disk refuses, whatever the file: the user's to fix, not lowbit's bug
_DISK_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# Errors a write to the run folder may meet, but a read of other files (the data) as well
_FILE_REFUSED = (errno.EACCES, errno.EPERM, errno.EIO)


def _refused_write(error: OSError, run_dir: Path) -> bool:
    """Whether ``error`` is the disk or the run folder refusing a write: a full or read-only
    disk, or no permission (an I/O error) on a file of the run folder, or on no file named. A
    file outside it that cannot be read is the error it is, not a run that cannot be written."""
    if error.errno in _DISK_REFUSED:
        return True
    if error.errno not in _FILE_REFUSED:
        return False
    if error.filename is None:
        return True
    return Path(os.fsdecode(error.filename)).resolve().is_relative_to(run_dir.resolve())


@dataclass
class RunResult:
    run_dir: Path
    config: TrainConfig
    steps: int
    status: str  # "completed" or "interrupted"
    start_metrics: dict
    final_metrics: dict
    train_loss: float
    throughput: float  # tokens (or images) per second of training steps
    unit: str
    step_time: float
    wall_time: float
    peak_rss_mb: float
    tensor_mb: float
    skipped_steps: int
    loss_scale: float
    checkpoint: Path | None
    sample: str | None = None
    extra: dict = field(default_factory=dict)
    evaluated_at: int | None = None  # the step of ``final_metrics``
    # whether the recipe scales the loss (fp16's): the others have no scale to report, and a
    # non-finite step stops them (or `auto`'s guard retries it) rather than being skipped
    loss_scaling: bool = True
    # how many of the steps `train_loss` averages over had a non-finite loss, left out of it
    nonfinite_losses: int = 0
    # the signal that asked an "interrupted" run to stop (None: completed, or another rank's stop)
    stop_signal: int | None = None

    def summary(self) -> str:
        c = self.config
        start, end = self.start_metrics, self.final_metrics
        # several processes: the memory figures are rank 0's alone (each rank holds about as
        # much, its own shards under FSDP2), unlabelled they read as the whole run's
        whose = f" (rank 0's, one of {c.nproc} processes)" if c.nproc > 1 else ""
        lines = [
            f"lowbit train: {c.task} {c.model}, recipe {c.recipe}, {self.steps} "
            f"step{'' if self.steps == 1 else 's'} ({self.status})",
            *self._nonfinite_warning(),
            f"  validation loss  {start.get('loss', float('nan')):.4f} -> "
            + (f"{end['loss']:.4f}" if "loss" in end else "(not evaluated in this session)")
            + "".join(
                f"   {k} {metric_text(start[k], '.4g')} -> {metric_text(end[k], '.4g')}"
                for k in ("ppl", "accuracy", "entity_f1")
                if k in end and k in start
            )
            # an interrupted run's last validation came before its last step: unlabelled, its
            # loss read as the checkpoint's
            + (
                f" (at step {self.evaluated_at})"
                if end and self.evaluated_at not in (None, self.steps)
                else ""
            ),
            f"  train loss       {self.train_loss:.4f} (mean of the last steps"
            # an fp16 run whose loss went NaN for good read as the mean of its steps before
            + (
                f"; {self.nonfinite_losses} of them non-finite, left out)"
                if self.nonfinite_losses
                else ")"
            ),
            f"  throughput       {self.throughput:,.0f} {self.unit}/s ({self.step_time:.3f} s/step)",
            # MiB (2**20 bytes) each, as the memory table's units: ru_maxrss is in KiB on Linux
            f"  peak memory      {self.peak_rss_mb:,.0f} MiB RSS; parameters, optimizer and "
            # the digits CNN's 45 KiB read "0.0 MiB"
            + (
                f"precision state {self.tensor_mb:,.1f} MiB"
                if self.tensor_mb >= 0.1
                else f"precision state {self.tensor_mb * 1024:,.1f} KiB"
            )
            + self.extra.get("device_memory", "")
            + whose,
            # "loss scale 1" of a recipe without loss scaling (bf16, fp32, auto) meant nothing
            f"  precision        skipped steps {self.skipped_steps}, loss scale {self.loss_scale:g}"
            if self.loss_scaling
            else "  precision        no loss scaling",
            *(
                [f"  auto plan        {self.extra['auto_plan']}"]
                if "auto_plan" in self.extra
                else []
            ),
            f"  wall time        {_duration(self.wall_time)}",
            f"  run folder       {self.run_dir}",
        ]
        if self.checkpoint:
            lines.append(f"  checkpoint       {self.checkpoint}")
        if "memory_table" in self.extra:
            lines += ["  memory (per component, measured at step 2):"]
            lines += ["    " + line for line in self.extra["memory_table"].splitlines()]
        if self.sample is not None:
            sample = self.sample.split("\n")[:12]
            lines += ["  sample:", *("    " + visible(line) for line in sample)]
        return "\n".join(lines)

    def _nonfinite_warning(self) -> list[str]:
        """The line that says a run ended with a non-finite validation loss: its summary read as
        a healthy run's otherwise, "completed" with a loss of nan among the figures."""
        loss = self.final_metrics.get("loss")
        if not isinstance(loss, float) or math.isfinite(loss):
            return []
        skipped = (
            f" ({self.skipped_steps} of {self.steps} steps skipped)" if self.loss_scaling else ""
        )
        return [
            f"  warning          validation loss is {loss}: the run diverged, its weights give no "
            f"finite loss{skipped}; fix: lower --lr, set --grad-clip, or use a higher-precision "
            "recipe"
        ]


def _finite_mean(losses: list[float]) -> float:
    """The mean of the finite ``losses`` (NaN where none is): a step that loss scaling skipped
    for its non-finite loss trained nothing, and counted, it made a run that ends finite report
    its train loss (and compare's train gap) as n/a."""
    finite = [loss for loss in losses if math.isfinite(loss)]
    return sum(finite) / len(finite) if finite else math.nan


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; fix: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r}: no CUDA device here; fix: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported; fix: use cpu or cuda")
    return device


def data_path(data: str | None) -> str | None:
    """The absolute form of a --data path or glob (None for lowbit's built-in data)."""
    return None if data in (None, "stdlib") else os.path.abspath(os.path.expanduser(data))


def model_path(config: TrainConfig) -> str | None:
    """The absolute form of a --model folder or config.json; None for a named model (a size,
    'minilm')."""
    from lowbit.models import causal_lm, token_classifier

    named = {"causal-lm": [*causal_lm.SIZES], "token-classification": [*token_classifier.SIZES]}
    if config.model in [*named.get(config.task, []), "minilm"]:
        return None
    return os.path.abspath(config.model) if os.path.exists(config.model) else None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a folder that holds another run (or anything else) unless told to,
    and into a quantized or pruned model's folder even then (``--overwrite`` would delete the
    config and tokenizer it is evaluated with).

    A run that stopped before its first checkpoint (a non-finite first step, say) holds nothing to
    resume, so a fresh run may replace its files without ``--overwrite``, unless other files are
    there too. Its run.json tells it from a config.yaml the user wrote (``--config exp/config.yaml
    --out exp``), which is theirs, not a run's to replace.

    ``--overwrite`` replaces a run: in a folder that holds none (a config.yaml without a run.json
    or a checkpoint is the user's), files and folders of the user's that bear the names a run
    writes (``checkpoints/``, ``tokenizer/``) are refused, not deleted.
    """
    from lowbit.infer import is_inference_dir

    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir}: exists and is not a folder; fix: choose another --out")
    if is_inference_dir(run_dir):  # its config.yaml is the source run's: no run of its own
        raise UsageError(
            f"{run_dir}: a folder written by lowbit quantize or prune, not a training run; fix: "
            "choose another --out (to continue training, --resume the run it was made from)"
        )
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"{run_dir}: no run to resume (no config.yaml); fix: check --out")
        if checkpoint.latest(run_dir) is None:
            raise UsageError(
                f"{run_dir}: the run stopped before its first checkpoint, so there is nothing to "
                f"resume; fix: start it again without --resume "
                f"({checkpoint.restart_command(run_dir)})"
            )
        return
    if not run_dir.exists():
        return
    names = {p.name for p in run_dir.iterdir()}
    holds_run = bool(names & {"config.yaml", RUN_INFO})  # a run writes run.json first
    found = checkpoint.latest(run_dir) if holds_run else None
    # A config.yaml alone may be the user's (the run writes its own in its place); a run is told
    # by its run.json or a checkpoint, and without one the other names a run writes are theirs.
    theirs = ", ".join(sorted(names & {*RUN_FILES, *RUN_FOLDERS} - {"config.yaml"}))
    no_run = RUN_INFO not in names and found is None
    if overwrite and no_run and theirs:
        held = "a config.yaml but no run.json" if holds_run else "no config.yaml"
        raise UsageError(
            f"{run_dir}: holds no run ({held}) for --overwrite to replace, but files it would "
            f"delete ({theirs}); fix: choose another --out, or move them away"
        )
    if overwrite or not names:
        return
    if holds_run:
        if no_run and theirs:
            raise UsageError(
                f"{run_dir}: holds a config.yaml but no run (no {RUN_INFO}), and files a run "
                f"would replace ({theirs}); fix: choose another --out, or move them away"
            )
        if no_run:
            raise UsageError(
                f"{run_dir}: holds a config.yaml but no run (no {RUN_INFO}); fix: choose another "
                "--out (a run writes its own config.yaml there), or --overwrite to replace it"
            )
        if found is None and names <= {*RUN_FILES, *RUN_FOLDERS}:
            return
        if found is None:
            raise UsageError(
                f"{run_dir}: holds a run that saved no checkpoint, and other files; fix: "
                "--overwrite to replace the run (the other files stay), or another --out"
            )
        raise UsageError(
            f"{run_dir}: already holds a run (checkpoint {found.name}); fix: --resume to continue "
            "it, --overwrite to replace it, or another --out"
        )
    raise UsageError(f"{run_dir}: folder is not empty; fix: choose another --out or empty it")


def clear_run_dir(run_dir: Path) -> None:
    """Remove the files a run writes (for ``--overwrite``); nothing else in the folder."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def changed_setting(saved: dict, config: TrainConfig, recorded: dict | None = None):
    """``(name, saved value, value now)`` of the first setting of a checkpoint's (``saved``) that
    ``config`` changes and a resumed run may not (`RESUMABLE_CHANGES`), None if there is none; a
    relative --data path or --model folder the checkpoint holds is compared as the absolute one
    ``recorded`` (run.json) holds, and so is a path of ``config`` that names it in another spelling
    (``./data.jsonl`` for ``data.jsonl``, the absolute path): the same file is not a change."""
    now = config.to_dict()
    for name in ("data", "model"):
        path, value = (recorded or {}).get(f"{name}_path"), saved.get(name)
        if path and value not in (None, "stdlib") and not os.path.isabs(value):
            saved = {**saved, name: path}
        given = now.get(name)
        if path and given not in (None, "stdlib") and data_path(given) == path:
            now[name] = saved[name]
    if saved.get("data") in (None, "stdlib") and now.get("data") in (None, "stdlib"):
        now["data"] = saved.get("data")  # the built-in data, named or not
    if saved.get("recipe") != now.get("recipe") and same_recipe(saved.get("recipe"), now["recipe"]):
        now["recipe"] = saved["recipe"]  # another spelling of one recipe (auto:fp8 is auto)
    changed = [k for k in saved if k not in RESUMABLE_CHANGES and saved[k] != now.get(k)]
    return (changed[0], saved[changed[0]], now.get(changed[0])) if changed else None


def check_resume_config(saved: dict, config: TrainConfig, recorded: dict | None = None) -> None:
    """Refuse a resumed run whose settings differ from the checkpoint's (`changed_setting`),
    naming the setting both as `TrainConfig` (a script's) and `lowbit train` (a user's) spell it,
    and the flags that give the run's value, which override a --config file's as well; where no
    flag gives it (a run without --override), leaving it out of a --config file too."""
    change = changed_setting(saved, config, recorded)
    if change:
        name, was, now = change
        task = saved.get("task")
        flag, given = flag_of(name), _as_flags(name, was, task)
        keep = f"with the run's {given} or without {flag}" if given else f"without {flag}"
        if not given:
            keep += f" or a --config file's {name}"
        may = ", ".join(sorted(map(flag_of, RESUMABLE_CHANGES)))
        default = was is None and getattr(TrainConfig(), name) is None
        source = flag
        if _run_file_says(config.out, name, now):  # edited since: without the flag, still refused
            source += ", as the run's config.yaml says now"
            # and without the flag: given too, with the file's value (the config cannot tell), it
            # would be refused again once the file is put back
            keep = f"with {name}: {json.dumps(was)} put back into its config.yaml"
            keep += f" and without {flag}" + (f", or with the run's {given}" if given else "")
        raise UsageError(
            f"cannot resume with {name} {_shown(name, now, task)} ({source}): the run was trained "
            f"with {'its default' if default else _shown(name, was, task)}; "
            f"fix: resume {keep}, or start a new run with another --out (a resume may "
            f"change only {may})"
        )


def _run_file_says(run_dir, name: str, value) -> bool:
    """Whether the config.yaml of the run in ``run_dir`` gives setting ``name`` as ``value``: a
    value refused for a resume that came from the file (edited after the run saved it) is not
    dropped by leaving its flag out, the fix the refusal offered alone."""
    try:
        return getattr(read(run_dir), name) == value
    except (UsageError, OSError, ValueError):  # unreadable: the refusal names the flag alone
        return False


def check_resumable(config: TrainConfig, distributed: bool) -> dict | None:
    """Refuse a resume that its newest checkpoint refuses (`check_checkpoint_kind`, a checkpoint
    that cannot be read, `check_resume_config`, a --steps below its step: `check_length`) before
    the model is built: a refused resume printed the start-up lines (layers kept, emulation
    warnings) of a run it would not start. A length in --epochs is checked by the `Trainer`, once
    its data gives the steps of an epoch. `Trainer._resume` checks again as it loads. Returns the
    checkpoint's state (`checkpoint.read_settings`), None where the run has none."""
    path = checkpoint.latest(config.out)
    if path is None:
        return None
    check_checkpoint_kind(path, distributed)
    state = checkpoint.read_settings(path)
    check_resume_config(state["config"], config, read_run_info(config.out))
    if config.steps:  # the run's length as the `Trainer` takes it (`total_steps`)
        check_length(config, config.steps, state["step"])
    return state


def check_length(config: TrainConfig, total_steps: int, step: int) -> None:
    """A resumed run can be lengthened, not shortened below the ``step`` it has reached:
    ``total_steps`` is the length ``config`` asks for."""
    if total_steps < step:
        asked = (
            f"steps {config.steps}"
            if config.steps is not None
            else f"epochs {config.epochs} ({total_steps} steps)"
        )
        raise UsageError(
            f"{asked} is below the run's step {step}; fix: ask for at least {step} steps, "
            "or leave --steps/--epochs out to keep the run's length"
        )


def _shown(name: str, value, task: str | None) -> str:
    """Setting ``name``'s ``value`` as a user wrote it: a None as the flag value that gives it
    (`spelled_none`: grad_clip's 0, causal-lm's data ``stdlib``), another value as its repr."""
    spelled = spelled_none(name, task) if value is None else None
    return repr(value) if spelled is None else spelled


def _as_flags(name: str, value, task: str | None) -> str:
    """Setting ``name`` at ``value`` as the flags that give it, to paste into a shell
    (``--lr 0.003``, one ``--override`` per entry, ``--grad-clip 0`` for None: `spelled_none` of
    the run's ``task``); empty for no entries, or a None that no flag gives, which a run without
    the flag has. A float is written as its repr, which reads back as the same float."""
    if value is None:
        value = spelled_none(name, task)
    values = value if isinstance(value, list) else [] if value is None else [value]
    return " ".join(f"{flag_of(name)} {shlex.quote(str(v))}" for v in values)


def build_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with states in ``config.optimizer_state``; matrices decay, vectors do not."""
    from lowbit.optim import build_optimizer as build_adamw

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return build_adamw(
        [g for g in groups if g["params"]],
        lr=config.lr,
        betas=(0.9, 0.95),
        state_precision=config.optimizer_state,
        seed=config.seed,
    )


def check_state_blocks(
    model, config: TrainConfig, world_size: int, process_counts: str = "--nproc {}"
) -> None:
    """A `UsageError` naming the process counts that work where FSDP over ``world_size`` ranks
    would give a rank a shard of some parameter that is not whole blocks of the quantized
    optimizer states: `lowbit.optim.adamw` refuses that at the first step, in terms of shards and
    dimensions, which a command-line user cannot act on. ``process_counts``: how the fix names
    them (torchrun's flag under torchrun)."""
    from lowbit.memory.estimate import (
        model_shape,
        rank_counts_keeping_state_blocks,
        splits_state_blocks,
    )
    from lowbit.optim.states import BLOCK_SIZE, state_precision

    precision = state_precision(config.optimizer_state)
    shape = model_shape(model, getattr(model, "config", None), config.model)
    if not splits_state_blocks(shape, precision, world_size):
        return
    # counts that split the global batch too: "--nproc 2 or 4" was offered for a batch of 6
    nearest = rank_counts_keeping_state_blocks(shape, precision, world_size, config.batch_size)
    processes = f"{process_counts.format(' or '.join(map(str, nearest)))}, or " if nearest else ""
    raise UsageError(
        f"fsdp over {world_size} processes splits the {BLOCK_SIZE[precision]}-value blocks of "
        f"{precision.value} optimizer states across ranks (the rows of some parameter do not "
        f"divide into whole blocks per rank); fix: {processes}--optimizer-state fp32 or bf16"
    )


# The byte tokenizer's ids, and the fewest a BPE tokenizer learns (256 bytes and end of text)
BYTE_VOCAB = 257


def planned_model(config: TrainConfig, resume: bool = False):
    """``(model, exact)``: the run's model on fake tensors (its shapes, no memory) as far as they
    are known before the data is read, for the checks that come before the model is built (a
    llama-7b in fp32 is 27 GB) or ranks are spawned. A fresh BPE vocabulary is not learned yet:
    that model has the byte tokenizer's ids, the fewest BPE learns, so it holds no more
    parameters than the run's, and ``exact`` is False. None where the shapes depend on the data
    (a fresh token-classification run's vocabulary and tags), and where the model cannot be
    planned (the run's own set-up then refuses it in its own words)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowbit.data import NUM_CLASSES
    from lowbit.memory.estimate import build_planned_model, load_model_config
    from lowbit.models import build_cnn, causal_lm

    exact = True
    try:
        if config.task == "image-classification":  # a CNN of a few thousand parameters
            return build_cnn(config.model, num_classes=NUM_CLASSES), exact
        if resume:  # the run folder's model, with its saved vocabulary
            model_config, name = load_model_config(config.out, config.task)
        elif config.task != "causal-lm":
            return None
        elif config.model in causal_lm.SIZES:
            exact = config.tokenizer == "byte"
            model_config, name = causal_lm.model_config(config.model, BYTE_VOCAB), config.model
        else:
            model_config, name = load_model_config(config.model, config.task)
        with FakeTensorMode():
            return build_planned_model(model_config, name, torch.float32, config.task), exact
    except UsageError:
        return None


def available_memory() -> int | None:
    """Bytes this machine can give new allocations without swapping (Linux's MemAvailable);
    None where that cannot be read (macOS, Windows)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the figure is in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_device_memory(device: torch.device) -> int:
    """Bytes free on the CUDA ``device`` (`torch.cuda.mem_get_info`: what the driver can still
    give, other processes' allocations taken). Reading it creates the device's CUDA context, which
    the run then trains in."""
    return torch.cuda.mem_get_info(device)[0]


def rank_device(device: torch.device) -> torch.device:
    """The device this process trains on: a rank torchrun (or the `--nproc` launcher) started
    trains on the GPU of its local rank (`lowbit.distributed.context.join`), not on cuda:0."""
    from lowbit.distributed.context import local_cuda_device, torchrun_env

    if device.type != "cuda" or not torchrun_env():
        return device
    return local_cuda_device()


def check_memory(
    model, config: TrainConfig, available: int, processes: int, device=None, shards: int = 1
) -> None:
    """Refuse a run whose model states alone (parameters, gradients, master weights and optimizer
    states under its recipe, `model_state_bytes_per_param`: activations not counted) exceed the
    ``available`` bytes, ``processes`` copies of them (DDP's ranks on this machine), or one of
    ``shards`` (FSDP's ranks, one per GPU) on the CUDA ``device``. Built, a model beyond the
    machine's memory was killed for it, or swapped for minutes, before any message."""
    from lowbit.memory.estimate import model_state_bytes_per_param

    per_param = model_state_bytes_per_param(recipe_of(config), config.optimizer_state)
    params = sum(p.numel() for p in model.parameters())
    needed = per_param * params * processes / shards
    if needed <= available:
        return
    copies = f" x {processes} DDP processes" if processes > 1 else ""
    copies += f", 1/{shards} per FSDP process" if shards > 1 else ""
    where = f"free on {device}" if device is not None else "available here"
    more = "--strategy fsdp over more GPUs" if device is not None else "a GPU"
    raise UsageError(
        f"model {config.model} ({params / 1e9:.2f}B parameters) needs {needed / 2**30:.1f} GiB for "
        f"its parameters, gradients and optimizer states alone ({per_param:.1f} bytes per "
        f"parameter under recipe {config.recipe}, --optimizer-state {config.optimizer_state}"
        f"{copies}), more than the {available / 2**30:.1f} GiB {where}; fix: plan it with "
        f"lowbit estimate --model {config.model} --recipe {config.recipe}, then a smaller "
        f"--model, --optimizer-state 8bit or {more}"
    )


def check_checkpoint_kind(path: Path, distributed: bool) -> None:
    """Refuse to resume a multi-process checkpoint (a ``.dcp`` folder) in one process, or a
    one-process checkpoint with a strategy (also the `--nproc` launcher's, before its ranks
    start: they refused it only after each had built the model)."""
    if path.is_dir() and not distributed:
        raise UsageError(
            f"{path}: a multi-process checkpoint; fix: resume with --strategy (and --nproc N, any N)"
        )
    if not path.is_dir() and distributed:
        raise UsageError(
            f"{path}: a one-process checkpoint cannot resume in several processes (--nproc, "
            "--strategy, torchrun); fix: resume without --strategy/--nproc"
        )


def preflight(
    config: TrainConfig,
    resume: bool = False,
    process_counts: str = "--nproc {}",
    gpu_memory: bool = True,
):
    """The checks that refuse a run before its model is built and its ranks are spawned (seconds
    to minutes, or an out-of-memory kill, later): its model states against the memory of the
    device it trains on (`check_memory`: this machine's on a CPU, the free bytes of this process's
    GPU on CUDA), and FSDP shards that split quantized optimizer-state blocks
    (`check_state_blocks`, where the shapes are known before the data is read). Both read the
    shapes of `planned_model`. ``gpu_memory=False`` leaves a GPU's memory unread: the `--nproc`
    launcher would hold the CUDA context that reading creates for the whole run, and each of its
    ranks checks its own GPU."""
    fsdp = config.strategy == "fsdp" and config.nproc > 1
    device = rank_device(resolve_device(config.device))
    if device.type == "cpu":
        available = available_memory()
    else:
        available = available_device_memory(device) if gpu_memory else None
    if available is None and not fsdp:
        return
    planned = planned_model(config, resume)
    if planned is None:
        return
    model, exact = planned
    if available is not None and device.type == "cuda":  # a GPU per rank
        check_memory(model, config, available, 1, device, config.nproc if fsdp else 1)
    elif available is not None:
        # DDP's ranks on this machine hold a copy each; FSDP's share one out
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", config.nproc))
        check_memory(model, config, available, local_ranks if config.strategy == "ddp" else 1)
    if fsdp and exact:
        check_state_blocks(model, config, config.nproc, process_counts)


def enable_activation_checkpointing(model, name: str) -> None:
    """Recompute each transformer block's forward during its backward instead of keeping what it
    saves (transformers' checkpointing of its layers), in PyTorch's non-reentrant form, the one
    that works under autocast, DDP and FSDP2. The recomputed forward gives the same bits, so the
    flag is not a numerics setting (a resumed run may toggle it)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(
            f"model {name} ({type(model).__name__}) does not support activation checkpointing; "
            "fix: drop --activation-checkpointing"
        )
    if not model.can_generate() and getattr(model.config, "use_cache", False):
        # an encoder (the tagger's BERT) caches nothing, yet its config's use_cache=True made
        # transformers print an "incompatible with gradient checkpointing" line, --quiet or not
        model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tensor_bytes(model, optimizer, precision) -> int:
    """Bytes of parameters, optimizer state and precision state (master weights, scalers...),
    each storage once; quantized optimizer states (8-bit, 4-bit, fp8 tensor subclasses) by the
    bytes they hold, not the fp32 size they stand for (`lowbit.memory.measure.tensor_bytes`)."""
    from lowbit.memory.measure import tensor_bytes as storage_bytes

    tensors: list[torch.Tensor] = []

    def add(obj):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                add(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                add(v)

    add(list(model.parameters()))
    add(list(model.buffers()))
    add(optimizer.state_dict().get("state", {}))
    with contextlib.suppress(Exception):
        add(precision.state_dict())
    return storage_bytes(tensors)


@contextlib.contextmanager
def _unobserved(model):
    """Within: the statistics observers of ``model``'s layers off. The memory report's extra
    forward runs in a step the monitor observes; observed, its operands (the first micro-batch's,
    a second time) replaced the step's own forward statistics."""
    observers = {layer: layer.lowbit_state.observer for layer in lowbit_layers(model).values()}
    for layer in observers:
        layer.lowbit_state.observer = None
    try:
        yield
    finally:
        for layer, observer in observers.items():
            layer.lowbit_state.observer = observer


@contextlib.contextmanager
def progress_bars_off(off: bool):
    """transformers' progress bars off within (a quiet run, a rank other than the first).

    Where the process has not imported transformers, without importing it (~1 s of CPU; a model
    not Hugging Face's, an image classifier, needs none): huggingface_hub's switch is then turned,
    which transformers takes for its own as it is imported within. Except where
    ``HF_HUB_DISABLE_PROGRESS_BARS`` is set false, which pins huggingface_hub's switch on (it
    refuses the turn) but not transformers' own: transformers is imported to turn that one."""
    if not off:
        yield
        return
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is None:
        from huggingface_hub import constants

        if constants.HF_HUB_DISABLE_PROGRESS_BARS is False:
            from transformers.utils import logging as transformers_logging
    if transformers_logging is not None:
        was_on = transformers_logging.is_progress_bar_enabled()
    else:
        import huggingface_hub.utils as hub_utils

        was_on = not hub_utils.are_progress_bars_disabled()
    if was_on:  # transformers' switch turns huggingface_hub's with its own
        if transformers_logging is not None:
            transformers_logging.disable_progress_bar()
        else:
            hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            transformers_logging = sys.modules.get("transformers.utils.logging")
            if transformers_logging is not None:  # imported before or within
                transformers_logging.enable_progress_bar()
            else:
                hub_utils.enable_progress_bars()


class Trainer:
    """A run being trained: task, model, precision, optimizer, and the step counter."""

    sample = True  # end a completed causal-lm run with a sample text (compare turns it off)
    # warn of a warmup as long as a new run (`warn_long_warmup`); compare, whose runs share
    # their length, warns of its first run's only
    warn_warmup = True
    # the run as its stop message and validation lines name it, where one process trains several
    # (`lowbit compare`'s, "study: fp32 seed 0"); None: the process's one run, as `lowbit train`
    run_name: str | None = None

    def __init__(
        self,
        config: TrainConfig,
        quiet: bool = False,
        dist=None,
        warn_emulation: bool = True,
        resume: bool = False,
        saved_run=None,
        check_conversion=None,
    ):
        """``warn_emulation=False`` leaves out the warnings that the recipe runs in emulation on
        the CPU and that an override applies to no layer (`lowbit compare` says them once per
        recipe, not once per seed). ``resume``: the trainer will continue the run in
        ``config.out`` (``fit(resume=True)``), so its task reads the tokenizer (a tagger's
        vocabulary and tags) that run saved: built again, a BPE tokenizer trained by another
        ``tokenizers`` version could hand the resumed model other ids. ``saved_run``: another
        run folder whose tokenizer (vocabulary, tags) the task reads, for a model that starts
        from that run's checkpoint (`lowbit doctor --checkpoint`). ``check_conversion(trainer)``
        runs once the model is converted, before the warnings of its conversion: `lowbit doctor`
        refuses an override that applies to no layer there, in one line, not after them."""
        import lowbit
        from lowbit.distributed import SINGLE

        self.config = config = resolve(config)
        self.dist = dist or SINGLE  # the ranks of a multi-process run (lowbit.distributed)
        self.quiet = quiet or not self.dist.is_main
        self.device = self.dist.device(resolve_device(config.device))
        recipe = recipe_of(config)
        if config.task == "causal-lm" and not resume and saved_run is None:
            from lowbit.data.corpus import check_not_tables

            # a new run's choice of data only: a run trained on a table is resumed on it
            check_not_tables(config.data)
        # a refused resume says only why: before the set-up and its start-up lines
        saved = check_resumable(config, self.dist.distributed) if resume else None
        if not self.dist.distributed:  # a rank's: the launcher checked before starting it
            preflight(config, resume)  # before the model is built: it may not fit
        seed_everything(config.seed)
        if resume:  # before the model is built from a --model folder changed since
            checkpoint.check_model_folder(config.out)
        # the task built and its data read (lazily: its fingerprint, its batches) with their
        # warnings said as they come, not held (`train`) with those of the set-up: one may
        # explain a refusal of the data (a compressed file not read, then the train split empty)
        with warnings_as_they_come():
            with progress_bars_off(self.quiet):  # transformers' "Loading weights" bar
                self.task = build_task(config, run_dir=config.out if resume else saved_run)
            self.dist.check_same_data(self.task.fingerprint)
            if resume:  # before the start-up lines, as `check_resumable`; `_resume` checks again
                self._check_same_data(read_run_info(config.out).get("data_fingerprint"))
            # Python's `random` again: the first task built in a process imports its data's
            # libraries (scikit-learn's rich draws from `random` as it loads), so a later run, or
            # a run resumed in the same process, started from another state than the first and
            # saved it otherwise
            random.seed(config.seed)
            self.built_to_resume = resume
            self.task.train_batches = self.dist.shard_batches(self.task.train_batches)
            if config.steps:
                self.total_steps = config.steps
            else:  # rounded before the ceiling: 1.1 epochs of 100 steps are 110.00000000000001
                steps = math.ceil(round(config.epochs * self.task.steps_per_epoch(), 9))
                # at least one: rounded to 0, `--epochs 1e-12` "completed" 0 steps, no checkpoint
                self.total_steps = max(1, steps)
            if saved is not None:  # before the start-up lines, as `check_resumable`
                check_length(config, self.total_steps, saved["step"])
        self.precision = lowbit.Precision(recipe, device=self.device)
        # Training mode: from_pretrained returns a checkpoint's model in eval mode, which would
        # train it with dropout off (`evaluating` restores this mode after each evaluation).
        converted = self.precision.convert(self.task.model.to(self.device).train())
        if self.dist.strategy == "fsdp":  # before the slow set-up, not at the first step
            from lowbit.distributed.launch import process_count_flag

            check_state_blocks(converted, config, self.dist.world_size, process_count_flag())
        if config.activation_checkpointing:  # before DDP/FSDP wrap the blocks it recomputes
            enable_activation_checkpointing(converted, config.model)
        # train_model: the forward of training steps (DDP's wrapper); model: everything else. The
        # ranks' gradients are summed: each backpropagates its share of the step's loss (`step`)
        self.train_model, self.model = self.dist.wrap(converted, self.precision, sum_gradients=True)
        if check_conversion is not None:
            check_conversion(self)
        say_held_notes()  # past the set-up's refusals: a refused run says only why
        report = self.precision.conversion_report
        warn = warn_emulation and self.dist.is_main  # quiet runs too, once per compare recipe
        if self.precision.keeps_every_layer and warn:
            summary = report.summary().replace("\n", "\n  ")
            print(
                f"lowbit: warning: recipe {config.recipe} keeps every GEMM layer of this model in "
                f"high precision, so it trains as its other ops do: {summary}",
                file=sys.stderr,
            )
        elif config.overrides and not self.quiet:
            summary = report.summary().replace("\n", "\n  ")
            print(f"lowbit: with the overrides, {summary}", file=sys.stderr)
        elif report.unused_overrides and warn:
            for text in report.unused_overrides:
                line = report.unused_override_line(text)
                print(f"lowbit: warning: {line}", file=sys.stderr)
        if report.kept and report.converted and not config.overrides and warn and not self.quiet:
            # the overrides' summary above names them already
            kept_in = dtype_name(self.precision.compute_dtype)
            print(f"lowbit: recipe {config.recipe} {report.kept_line(kept_in)}", file=sys.stderr)
        if warn:
            for line in ignored_settings(config):
                print(f"lowbit: warning: {line}", file=sys.stderr)
        self.optimizer = self.precision.wrap_optimizer(build_optimizer(self.model, config))
        self.monitor = build_monitor(self.model, recipe, config.stats_interval)
        emulated = emulated_layers(self.model)
        if emulated and warn and self.device.type == "cpu":
            print(
                f"lowbit: warning: recipe {config.recipe} has no native kernels on the CPU; its "
                f"{len(emulated)} low-precision layer{'s' if len(emulated) > 1 else ''} run"
                f"{'' if len(emulated) > 1 else 's'} in bit-faithful emulation (slower than "
                "native kernels)",
                file=sys.stderr,
            )
        if warn and self.device.type == "cpu" and (slow := bf16_gemm_warning(recipe)):
            print(f"lowbit: warning: {slow}", file=sys.stderr)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.records: list = []  # (split, record) of the monitor for the last step
        self.step_idx = 0
        self.stop_requested = False
        self.stop_said = False  # rank 0 said why the run stops: its own signal says nothing more
        self.abort_requested = False  # a second Ctrl-C (`_stop_on_sigint`)
        self.stop_signal: int | None = None  # the signal that asked for the stop, as it came
        self.stop_step = 1  # the step after which a stop asked now saves and stops (`_fit`)
        self.start_metrics: dict = {}
        self.last_metrics: dict = {}
        self.last_metrics_step = 0  # the step `last_metrics` evaluated
        self.recent_losses: list[float] = []
        self.nonfinite_in_row = 0  # the last steps' losses non-finite, in a row (loss scaling)
        self.counted = 0  # tokens (or images) trained on
        self.step_seconds = 0.0
        self.memory: str | None = None  # measured vs estimated breakdown (second step)

    def set_lr(self) -> float:
        lr = lr_at(self.config, self.step_idx, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches."""
        accum, precision = self.config.grad_accum, self.precision
        # each rank's share of the step's mean loss: DDP/FSDP sum the ranks' gradients, so that
        # inside the backward each gradient is the one one process computes for the same rows
        # (averaged after a backward of the rank's whole mean, they were N times that, and fp16's
        # scaled gradients overflowed at 1/N of one process's loss scale)
        shares = accum * self.dist.world_size
        lr = self.set_lr()
        batches = [to_device(next(self.task.train_batches), self.device) for _ in range(accum)]
        weights = self._loss_weights(batches)
        self.monitor.before_step(self.step_idx + 1)
        # until the monitor's guard lets the step through: at once without `auto`, after at most
        # its controller's `max_retries` rollbacks with it (a cap of the trainer's own, below the
        # controller's, ended the loop on a rollback: an update of zeroed gradients, silently)
        for attempt in itertools.count():
            loss_sum, count = 0.0, 0
            for i, batch in enumerate(batches):
                with self.dist.accumulating(self.train_model, more=i < accum - 1):
                    with precision.autocast():
                        loss, n = self.task.loss(self.train_model, batch)
                    if weights[i] != 1.0:
                        loss = loss * weights[i]
                    precision.backward(loss / shares)
                loss_sum += loss.detach()
                count += n
            loss_value = self.dist.mean(float(loss_sum) / accum)  # the mean over every term
            # the `auto` guard: a non-finite step is rolled back and retried in higher precision
            if not self.monitor.retry(self.step_idx + 1, loss_value, self.params, attempt):
                break
            self.dist.zero_grad(self.optimizer)
        count = int(self.dist.total(count))
        # Plain one-process runs only: DDP/FSDP parameters (DTensors) are per-rank accounting.
        measuring = 0.0  # seconds of this step spent on the memory report, not on training
        if self.step_idx == 1 and self.memory is None and self.dist.strategy is None:
            started = time.perf_counter()
            self.memory = self._memory_report(batches[0])  # gradients exist, not yet stepped
            measuring = time.perf_counter() - started
        stop = precision.finite_loss_policy != "skip"
        if stop and not math.isfinite(loss_value):
            raise NonFiniteLoss(f"loss is {loss_value} at step {self.step_idx + 1}")
        self._count_nonfinite_loss(loss_value)
        grad_norm = float(precision.clip_grad_norm_(self.optimizer, self.config.grad_clip))
        if stop and not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"gradient norm is {grad_norm} at step {self.step_idx + 1}")
        stepped = precision.step(self.optimizer)
        if not stepped and precision.loss_scale <= SMALLEST_SCALE:
            # a dynamic scale that halved to its floor (~142 overflows in a row from 2^16): every
            # step overflows whatever the scale, and skipping them all trained nothing, silently
            raise NonFiniteLoss(
                f"step {self.step_idx + 1} overflowed at the smallest loss scale, 2^-126, to which "
                "the dynamic scale fell backing off at each overflow: the loss or gradients are "
                "inf or NaN at any scale"
            )
        self.dist.zero_grad(self.optimizer)
        self.step_idx += 1
        self.records = self.monitor.after_step(self.step_idx, grad_norm, precision.loss_scale)
        return {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "stepped": bool(stepped),
            "count": count,
            "measuring_seconds": measuring,
        }

    def _count_nonfinite_loss(self, loss_value: float) -> None:
        """Count the steps in a row whose loss is non-finite (skipped under loss scaling); raise
        `NonFiniteLoss` at `NONFINITE_LOSSES_IN_ROW` of them."""
        finite = math.isfinite(loss_value)
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        if self.nonfinite_in_row >= NONFINITE_LOSSES_IN_ROW:
            first = self.step_idx + 2 - self.nonfinite_in_row
            raise NonFiniteLoss(
                f"loss is {loss_value} at steps {first}-{self.step_idx + 1}, "
                f"{self.nonfinite_in_row} in a row: loss scaling skips them, but a skipped step "
                "keeps the weights that gave its non-finite forward pass"
            )

    def _loss_weights(self, batches) -> list[float]:
        """The weight of each micro-batch's mean loss, so that the step's loss is the mean over
        every loss term of the step on every rank, as one process computes it on the whole batch.

        Micro-batch i of a rank holds t_i terms (labelled words vary with padding and sentence
        length); over R ranks and A micro-batches the step holds T terms. Each rank backpropagates
        sum_i w_i * loss_i / (R * A), and DDP/FSDP sum the ranks' gradients, so
        w_i = t_i * R * A / T gives sum over ranks and micro-batches of t_i * loss_i / T. Where
        every batch holds as many terms (an LM's windows, full image batches) each weighs 1, with
        no exchange between the ranks."""
        terms = [self.task.loss_terms(batch) for batch in batches]
        if None in terms:
            return [1.0] * len(batches)
        total = max(self.dist.total(float(sum(terms))), 1.0)
        shares = self.dist.world_size * len(batches)
        return [t * shares / total for t in terms]  # integers up to the division: 1 exactly

    def evaluate(self, split: str = "validation", max_batches=None) -> dict:
        return self.task.evaluate(self.model, self.precision, split, max_batches)

    def state_dict(self, model: bool = True) -> dict:
        """Everything to resume from; ``model=False`` leaves model and optimizer out (multi-process
        checkpoints save those through torch.distributed.checkpoint)."""
        weights = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        return {
            "step": self.step_idx,
            **(weights if model else {}),
            "precision": self.precision.state_dict(),
            "data": self.task.train_batches.state_dict(),
            "rng": rng_state(),
            "trainer": {
                "start_metrics": self.start_metrics,
                # the run's last validation, which a resumed run stopped before its next one
                # reports (its run.json read {} there, as if the run had never been validated)
                "last_metrics": self.last_metrics,
                "last_metrics_step": self.last_metrics_step,
                "recent_losses": self.recent_losses,
                # a run resumed among its non-finite steps stops where it would have
                "nonfinite_in_row": self.nonfinite_in_row,
                "counted": self.counted,
                "step_seconds": self.step_seconds,
            },
            "config": self.config.to_dict(),
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "model" in state:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["precision"])
        self.task.train_batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step_idx = int(state["step"])
        self.monitor.load_state_dict(state.get("monitor", {}))
        for name, value in state["trainer"].items():
            setattr(self, name, value)
        if "nonfinite_in_row" not in state["trainer"]:  # a checkpoint from before session 43
            self.nonfinite_in_row = _nonfinite_at_the_end(self.recent_losses)

    def save(self) -> Path:
        c = self.config
        if self.dist.distributed:
            from lowbit.distributed import checkpoint as dcp_checkpoint

            return dcp_checkpoint.save(self)
        return checkpoint.save(self.state_dict(), c.out, self.step_idx, c.keep_last)

    def _save(self, logger) -> Path:
        """The checkpoint, after the metrics up to it are out of the logger's buffers: a run
        killed later (SIGKILL, out of memory) resumes with its curves complete to that step. Its
        step goes into run.json too (`_record_end` says how the run ended): a run killed after its
        last checkpoint, in the final evaluation or sample, read as "running" at step 0."""
        logger.flush()
        saved = self.save()
        self._record_progress(self.dist.is_main, Path(self.config.out))
        return saved

    def _not_written(self, error: OSError) -> RunNotWritten:
        """The error for a write to the run folder that failed (``error``) while training: the
        bare OSError of a full disk named no file, so the user learnt neither which folder filled
        up, nor what was kept, nor how to continue."""
        run_dir, kept = Path(self.config.out), checkpoint.latest(self.config.out)
        if kept is None and not (run_dir / "config.yaml").is_file():  # the disk refused it
            then, left = None, "no checkpoint was saved"  # nothing to restart from: run it again
        elif kept is None:
            then, left = checkpoint.restart_command(run_dir), "no checkpoint was saved"
        else:
            then = resume_command(run_dir)
            left = f"the last complete checkpoint {kept.name} is intact"
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        return RunNotWritten(
            f"{run_dir}: cannot write the run at step {self.step_idx} ({error.strerror}); {left}",
            "free disk space" if full else "make the folder writable",
            then,
        )

    def fit(self, resume: bool = False, overwrite: bool = False, on_step=None) -> RunResult:
        """Train to ``total_steps``, writing the run folder; see `train`. The folder is locked
        while the run writes it (`RunLock`)."""
        lock = RunLock(Path(self.config.out))
        try:
            return self._fit(lock, resume, overwrite, on_step)
        finally:
            lock.release()

    def _fit(self, lock: RunLock, resume: bool, overwrite: bool, on_step) -> RunResult:
        if resume and not self.built_to_resume:  # its task built another tokenizer than the run's
            raise ValueError("a Trainer resumes only if made with Trainer(config, resume=True)")
        if self.step_idx and not resume:  # a fresh start would clear the folder it trained into
            raise UsageError(
                f"this Trainer has already trained to step {self.step_idx}; fix: a new Trainer "
                "for a new run, or Trainer(config, resume=True).fit(resume=True) to continue it"
            )
        c, run_dir, t_start = self.config, Path(self.config.out), time.perf_counter()
        main = self.dist.is_main
        if main:
            lock.take()
            check_run_dir(run_dir, resume, overwrite)
        # run.json as the run left it: read before the barrier, after which rank 0 rewrites it
        recorded = read_run_info(run_dir) if resume else {}
        self.dist.barrier()  # the other ranks read the run folder only after rank 0 checked it
        resume_step = None
        if resume:
            self._resume(checkpoint.latest(run_dir), recorded)
            resume_step = self.step_idx
            check_length(c, self.total_steps, self.step_idx)
            if main and recorded.get("status") == "running":  # this process holds the lock now
                self._note_killed(run_dir, recorded)
            if main and self.step_idx == self.total_steps and self.run_name is None:
                # a resume without a longer --steps trains nothing: it printed the run's summary
                # again, as if it had trained (a study's run is resumed for its record)
                print(
                    f"lowbit: note: {run_dir} has trained its {self.total_steps} steps already; "
                    f"to train it on, resume with --steps above {self.total_steps}",
                    file=sys.stderr,
                )
        else:
            if self.warn_warmup:  # rank 0's (`warn`); a resumed run was warned of as it started
                warn_long_warmup(c, self.total_steps)
            # Before anything is written: bad validation data (or a Ctrl-C) leaves no folder.
            self.start_metrics = self.evaluate()
            # the run's last validation until the first interval's: a run stopped before that
            # reports it, as its metrics.jsonl has it
            self.last_metrics, self.last_metrics_step = self.start_metrics, 0
            if main:  # check_run_dir let only --overwrite or a checkpointless run's files through
                run_dir.mkdir(parents=True, exist_ok=True)
                lock.take()  # checked again under the lock: a run may have started there since
                check_run_dir(run_dir, resume, overwrite)
                clear_run_dir(run_dir)
        try:  # a full disk here named no folder: the bare "No space left on device"
            if main:
                run_dir.mkdir(parents=True, exist_ok=True)
                # run.json first: a run killed before its config.yaml is still told from a
                # config.yaml the user wrote (check_run_dir), and the next run replaces it
                self._write_run_info(run_dir, resume_step)
                write(c, run_dir)
                if not resume:  # a resumed run has just read them; rewritten, a kill could tear
                    self.task.save_artifacts(run_dir)
                    # their sha256, which every later load checks (`check_run_files`)
                    files = checkpoint.run_files_record(run_dir, c)
                    if error := self._update_run_info(main, run_dir, run_files=files):
                        raise error
            logger = (
                MetricsLogger(run_dir, c.to_dict(), resume_step, wandb=c.wandb, quiet=self.quiet)
                if main
                else NullLogger()
            )
        except OSError as error:
            self._record_end(main, run_dir, "failed", str(error))
            if not _refused_write(error, run_dir):
                raise
            raise self._not_written(error) from error
        last_saved = checkpoint.latest(run_dir)
        status = "completed"
        try:
            if not resume:
                logger.log(0, "validation", self.start_metrics)
            desc = f"{c.task} {c.recipe}"
            bar = progress_bar(self.total_steps, desc, "step", self.step_idx, self.quiet)
            with bar, _stop_on_sigint(self):
                self.stop_step = self.step_idx + 1
                while self.step_idx < self.total_steps:
                    t0 = time.perf_counter()
                    out = self.step()
                    dt = time.perf_counter() - t0 - out["measuring_seconds"]  # training only
                    self.step_seconds += dt
                    self.counted += out["count"]
                    self.recent_losses = [*self.recent_losses, out["loss"]][-TRAIN_LOSS_STEPS:]
                    rate = out["count"] / dt
                    logger.log(
                        self.step_idx,
                        "train",
                        {
                            "loss": out["loss"],
                            "lr": out["lr"],
                            "grad_norm": out["grad_norm"],
                            "loss_scale": self.precision.loss_scale,
                            "skipped_steps": self.precision.skipped_steps,  # the run's so far
                            f"{self.task.unit}_per_s": rate,
                        },
                    )
                    for split, record in self.records:
                        logger.log(self.step_idx, split, record)
                    # the step's postfix before the update that shows it
                    bar.set_postfix_str(
                        f"loss {out['loss']:.4f} {rate:,.0f} {self.task.unit}/s", refresh=False
                    )
                    bar.update(1)
                    last = self.step_idx == self.total_steps
                    if self.step_idx % c.eval_interval == 0 or last:
                        metrics = self.last_metrics = self.evaluate()
                        self.last_metrics_step = self.step_idx
                        logger.log(self.step_idx, "validation", metrics)
                        if not self.quiet:  # a study's run (`run_name`) named, as its stop is
                            named = f"{self.run_name}: " if self.run_name else ""
                            bar.write(
                                f"{named}step {self.step_idx}: validation loss "
                                f"{metrics['loss']:.4f}"
                            )
                    saved_now = self.step_idx % c.save_interval == 0 or last
                    if saved_now:
                        last_saved = self._save(logger)
                    if on_step is not None:
                        on_step(self)
                    asked = self.stop_requested
                    self.stop_step = self.step_idx + 1  # a stop asked from here: the next step's
                    if self.dist.any(asked) and not last:  # all ranks stop together
                        # a signal to another rank: say why (read again: a signal to every rank
                        # that reached this one during the agreement has been handled now). One
                        # that reaches this one later (a group's signal, skewed) says no more
                        if main and not self.stop_requested:
                            print(_stop_message_of_another_rank(self), file=sys.stderr)
                            self.stop_said = True
                        if not saved_now:  # a stop on a save step keeps the step's checkpoint
                            last_saved = self._save(logger)
                        status = "interrupted"
                        break
            logger.close()  # its last records: on a full disk, the error of a run not written
        except NonFiniteLoss as error:
            logger.log(self.step_idx + 1, "train", {"non_finite": 1})
            for split, record in self.monitor.stopped_records():  # auto: what the guard blamed
                logger.log(self.step_idx + 1, split, record)
            logger.close(quietly=True)
            self._record_end(main, run_dir, "diverged", str(error))
            # a loss-scaled recipe is one already
            other = "" if self.precision.scaler.enabled else "loss-scaled or "
            raise NonFiniteLoss(
                f"{error} (recipe {c.recipe}); stopped, {self._kept_checkpoint(last_saved)}; fix: "
                f"lower --lr, set --grad-clip, or use a {other}higher-precision recipe"
            ) from None
        except OSError as error:
            logger.close(quietly=True)  # on a full disk its flush fails too
            self._record_end(main, run_dir, "failed", str(error))
            if not _refused_write(error, run_dir):
                raise
            raise self._not_written(error) from error
        except BaseException as error:
            # A second Ctrl-C inside a checkpoint save across ranks reaches here wrapped in
            # torch.distributed.checkpoint's CheckpointException, and one Python raises in a
            # class's __set_name__ in a RuntimeError (`is_interrupt`): a traceback, "failed",
            # where the run was aborted as asked
            aborted = is_interrupt(error) or self.abort_requested
            logger.close(quietly=True, aborted=aborted)
            if aborted:  # its repr, "KeyboardInterrupt()", said neither what nor where
                by = "a second Ctrl-C" if self.abort_requested else "KeyboardInterrupt"
                self._record_end(main, run_dir, "aborted", f"{by} after step {self.step_idx}")
            else:
                self._record_end(main, run_dir, "failed", repr(error))
            if aborted and not isinstance(error, KeyboardInterrupt):
                raise KeyboardInterrupt from error
            raise
        result = self._result(run_dir, status, last_saved, time.perf_counter() - t_start)
        # a run.json left "running" (a full disk) reads as a run that was killed: the run is
        # saved, but the folder is not as it says, and the exit status said all was well
        # with the step they were measured at: an interrupted run's last validation may come
        # before its `step`, and read as the metrics of the checkpoint there
        unrecorded = self._record_end(
            main,
            run_dir,
            status,
            final_metrics=result.final_metrics,
            final_metrics_step=result.evaluated_at,
        )
        if unrecorded is not None and _refused_write(unrecorded, run_dir):
            raise self._not_written(unrecorded) from unrecorded
        return result

    def _kept_checkpoint(self, last_saved: Path | None) -> str:
        """What a diverged run keeps. A checkpoint saved among (or just before) the skipped steps
        of non-finite losses holds the weights that gave them: a run skips no update but theirs."""
        if last_saved is None:
            return "no checkpoint was saved"
        first_nonfinite = self.step_idx + 2 - self.nonfinite_in_row
        in_row = self.nonfinite_in_row >= NONFINITE_LOSSES_IN_ROW
        if in_row and checkpoint.step_of(last_saved) >= first_nonfinite - 1:
            return (
                f"last checkpoint {last_saved} holds the weights of the non-finite steps "
                "(resumed, it stops again)"
            )
        return f"last good checkpoint {last_saved}"

    def _record_progress(self, main: bool, run_dir: Path) -> None:
        """Record in run.json the step of the checkpoint just saved (best effort, as `_record_end`:
        the checkpoint is what a resume needs)."""
        self._update_run_info(main, run_dir, step=self.step_idx)

    def _record_end(
        self, main: bool, run_dir: Path, status: str, error=None, **fields
    ) -> OSError | None:
        """Record in run.json how the run ended (completed, interrupted: resumable, diverged,
        aborted by a second Ctrl-C, failed), at which step, and why where it failed, for a script
        that reads a folder of runs; the error of a write that failed (`_update_run_info`)."""
        if error is not None:
            fields["error"] = " ".join(error.split())
        return self._update_run_info(main, run_dir, status=status, step=self.step_idx, **fields)

    @staticmethod
    def _update_run_info(main: bool, run_dir: Path, **fields) -> OSError | None:
        """Set ``fields`` in the run.json rank 0 wrote as the run started. Best effort: a disk that
        refused the run's other writes may refuse this one too, and the error that ended the run
        (or the checkpoint just saved) is what counts; the write's error is returned, for a run
        that ends well to report."""
        if not main:
            return None
        info = read_run_info(run_dir)
        if not info:  # none written (or unreadable): nothing to add to
            return None
        info.update(fields)
        # NaN is no JSON: None in a copy, as the metrics given may be the run's own (its
        # start_metrics, the last validation's), which its summary formats after this write
        if info.get("final_metrics"):
            info["final_metrics"] = {
                name: None if isinstance(value, float) and not math.isfinite(value) else value
                for name, value in info["final_metrics"].items()
            }
        try:
            text = json.dumps(info, indent=2, default=str) + "\n"
            write_atomically(run_dir / RUN_INFO, text)
        except OSError as error:
            return error
        return None

    def _check_same_data(self, recorded: dict | None) -> None:
        """A resumed run trains on the contents it trained on (a file edited since, or a relative
        path that names another file from here, would continue on other data)."""
        from lowbit.train.tasks import same_data, split_rule_note

        if not same_data(recorded, self.task.fingerprint):
            raise UsageError(
                f"cannot resume {self.config.out}: its data {self.config.data or '(built-in)'} "
                "holds other contents than the run trained on (the fingerprint in run.json "
                "differs); fix: restore the data the run read, or start a new run"
                + split_rule_note(self.config)
            )

    def _resume(self, path: Path, recorded: dict) -> None:
        """Load the checkpoint at ``path`` after the checks that name why it may not be: its
        settings (a --data naming another file is a setting changed, not data whose contents
        changed), then its data's contents, before the batches' state fails with less clue."""
        check_checkpoint_kind(path, self.dist.distributed)
        sharded = path.is_dir()  # a multi-process checkpoint
        if sharded:
            from lowbit.distributed import checkpoint as dcp_checkpoint

            state = dcp_checkpoint.read(path)
        else:
            state = checkpoint.load(path)
        check_resume_config(state["config"], self.config, recorded)
        self._check_same_data(recorded.get("data_fingerprint"))
        if sharded:
            dcp_checkpoint.load(self, path, state)
        else:
            self.load_state_dict(state)

    def _note_killed(self, run_dir: Path, recorded: dict) -> None:
        """Say that the run resumed had died without a word, or may still run on another host
        (`lowbit.train.runstate.resumed_text`), and from which step it goes on: the steps it took
        after that checkpoint are lost."""
        name = self.run_name or run_dir
        print(
            f"lowbit: note: {name}: {resumed_text(run_dir, recorded)}; resuming from its "
            f"checkpoint at step {self.step_idx}",
            file=sys.stderr,
        )

    def _write_run_info(self, run_dir: Path, resume_step) -> None:
        import lowbit
        from lowbit.models.pretrained import model_record
        from lowbit.models.token_classifier import package_folder

        folder = model_path(self.config)
        # --model minilm: the installed package's folder, recorded (not as a model_path, which a
        # resumed or evaluated run reads --model from) so that an upgrade of it is told
        built_from = folder or package_folder(self.config.task, self.config.model)
        info = {
            "task": self.config.task,
            "data_fingerprint": self.task.fingerprint,
            # where a relative --data pointed from the folder the run was started in
            "data_path": data_path(self.config.data),
            "model_path": folder,  # likewise for a --model folder
            # its config (and tokenizer files), which every later load of the run builds the
            # model from again: `checkpoint.check_model_folder`
            "model_record": model_record(built_from, self.config.task) if built_from else None,
            # a resumed run's own tokenizer, tags, vocabulary (checked as it was built; a new
            # run's are saved, and recorded, after this file: `_fit`)
            "run_files": (
                checkpoint.run_files_record(run_dir, self.config) if resume_step is not None else {}
            ),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "total_steps": self.total_steps,
            "device": str(self.device),
            "torch": torch.__version__,
            "lowbit": getattr(lowbit, "__version__", None),
            "conversion": self.precision.conversion_report.summary(),
            "resumed_from_step": resume_step,
            "world_size": self.dist.world_size,
            "strategy": self.dist.strategy,
            # until `_record_end` says how it ended; still "running" after a kill (no process
            # holds the folder's lock then: `lowbit.train.runstate`)
            "status": "running",
            "step": self.step_idx,
            **process_fields(),
        }
        write_atomically(run_dir / RUN_INFO, json.dumps(info, indent=2, default=str) + "\n")

    def _memory_report(self, batch) -> str:
        """The live run's memory by component (tensor accounting) beside the estimator's figure.

        Activations are the bytes saved for backward by one extra forward of ``batch`` (with
        activation checkpointing: at the peak, `checkpointed_peak`); the estimate exists for
        causal LMs and token classifiers (the CNN, and architectures whose forward cannot be
        traced on fake tensors: live only).
        """
        from lowbit.memory import checkpointed_peak, estimate, measure, measure_activations
        from lowbit.memory.estimate import TASKS

        def forward():
            with self.precision.autocast():
                return self.task.loss(self.train_model, batch)[0]

        live = measure(self.model, self.optimizer, self.precision)
        # its forward's draws (dropout masks) from a copy of the generators: drawn from the run's,
        # they changed every later step's masks, and a one-process run (a token classifier)
        # trained otherwise than the same run with --strategy, which takes no report
        cuda = [self.device] if self.device.type == "cuda" else []
        with checkpointed_peak(self.model), _unobserved(self.model), torch.random.fork_rng(cuda):
            saved = measure_activations(self.model, forward, backward=True)
        live.activations, live.temporaries = saved.activations, saved.temporaries
        live.logits_gradient = saved.logits_gradient
        live.backward_workspace = saved.backward_workspace
        c = self.config

        # what the total line says: whether the gradients are live as the backward starts
        said = dict(checkpointed=c.activation_checkpointing, grad_accum=c.grad_accum)

        def alone() -> str:  # titled so: `table`'s single column is an estimate's by default
            return live.table(titles=("measured",), **said)

        if c.task not in TASKS:
            return alone()
        recipe = self.precision.recipe
        if self.monitor.controller is not None:  # auto: the plan this step computes in
            from lowbit.recipes.auto import at_plan

            controller = self.monitor.controller
            recipe = at_plan(recipe, controller.plan, self.step_idx, controller.idle)
        try:
            planned = estimate(
                self.model.config,
                recipe,
                c.optimizer_state,
                c.batch_size,
                c.seq_len,
                activation_checkpointing=c.activation_checkpointing,
                task=c.task,
            )
        except UsageError:  # the estimator cannot trace this architecture's forward
            return alone()
        table = planned.table(live, **said)
        emulated = self.precision.emulates_fp16 or any(
            not layer.spec.is_identity for layer in lowbit_layers(self.model).values()
        )
        # said only where the columns differ: recipes whose layers keep their input as it came
        # (fp8-rowwise, blockwise, MX, NVFP4) save on the CPU what the estimate counts
        differ = (planned.activations, planned.temporaries) != (live.activations, live.temporaries)
        if emulated and differ:  # docs/memory.md: the estimate models native kernels
            table += (
                "\n(activations and temporaries: the estimate is a GPU storing the formats "
                "natively; this CPU emulation saves other tensors, docs/memory.md)"
            )
        return table

    def _result(self, run_dir, status, last_saved, wall) -> RunResult:
        final, evaluated_at = self.last_metrics, self.last_metrics_step
        if status == "completed" and not final:
            final, evaluated_at = self.evaluate(), self.step_idx
        if not final:  # a resumed run interrupted before its first validation measured none
            evaluated_at = None
        extra = {}
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            extra["device_memory"] = f"; CUDA peak allocated {peak:,.0f} MiB"
        if self.memory:
            extra["memory_table"] = self.memory
        if self.monitor.controller is not None:  # auto: its plan, why in metrics.jsonl's "moves"
            extra["auto_plan"] = self.monitor.controller.describe()
        sample = None
        # Sampling is one process's job; FSDP's forward needs every rank: no sample there.
        alone = self.dist.is_main and self.dist.strategy != "fsdp"
        if self.sample and alone and self.config.task == "causal-lm" and status == "completed":
            from lowbit.train.generate import sample_text

            # the run is complete and saved: a Ctrl-C while it samples skips the sample, not the
            # summary (it was "aborted" with exit 130, and looked like a run to resume)
            # (and a model whose output is NaN has none to give: `sample_text` refuses it)
            with self.dist.alone(), contextlib.suppress(KeyboardInterrupt, UsageError):
                sample = sample_text(
                    self.model,
                    self.task.tokenizer,
                    self.precision,
                    self.task.sample_prompt(),
                    max_new_tokens=SAMPLE_TOKENS,
                    temperature=0.8,
                    top_k=40,
                    seed=0,
                    say_cut=False,  # the run's own sample: no length was asked for
                )
        return RunResult(
            run_dir=run_dir,
            config=self.config,
            steps=self.step_idx,
            status=status,
            start_metrics=self.start_metrics,
            final_metrics=final,
            train_loss=_finite_mean(self.recent_losses),
            nonfinite_losses=sum(not math.isfinite(loss) for loss in self.recent_losses),
            throughput=self.counted / max(self.step_seconds, 1e-9),
            unit=self.task.unit,
            step_time=self.step_seconds / max(1, self.step_idx),
            wall_time=wall,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            tensor_mb=tensor_bytes(self.model, self.optimizer, self.precision) / 2**20,
            skipped_steps=int(self.precision.skipped_steps),
            loss_scale=float(self.precision.loss_scale),
            loss_scaling=self.precision.scaler.enabled,
            checkpoint=last_saved,
            stop_signal=self.stop_signal if status == "interrupted" else None,
            sample=sample,
            extra=extra,
            evaluated_at=evaluated_at,
        )


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, quiet: bool = False):
    """Progress on stderr, of training (``unit`` step) or of an evaluation (batch): tqdm's bar on
    a terminal, `_LogProgress`'s plain line elsewhere (a log, a batch job, CI), none with
    ``quiet``."""
    from tqdm import tqdm

    if quiet or sys.stderr.isatty():
        return tqdm(
            total=total,
            initial=initial,
            disable=quiet,
            desc=desc,
            unit=unit,
            dynamic_ncols=True,
            file=sys.stderr,
        )
    return _LogProgress(total, initial, desc, unit)


class _LogProgress:
    """The progress on a stderr that is no terminal (``2> log``, a batch job, CI): tqdm's bar
    there is a refresh per step joined by carriage returns into one huge line. This writes a
    plain line of the same (step, loss, speed, time left) at most once a minute, so that a log
    shows the run moving between its validation lines, and a long `lowbit eval` its batches; it
    has the part of tqdm's interface the training loop and `eval_progress` use."""

    interval = 60.0  # seconds between lines

    def __init__(self, total: int, initial: int, desc: str, unit: str):
        self.total, self.n, self.desc, self.unit, self.postfix = total, initial, desc, unit, ""
        self.start_n, self.start = initial, time.monotonic()
        self.last = self.start

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *_) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        left = (now - self.start) / (self.n - self.start_n) * (self.total - self.n)
        postfix = f", {self.postfix}" if self.postfix else ""  # an evaluation has none
        print(
            f"{self.desc}: {self.unit} {self.n}/{self.total}{postfix}, "
            f"about {_duration(left)} left",
            file=sys.stderr,
            flush=True,
        )

    def write(self, text: str) -> None:
        """A line of the loop's own (a validation loss), to stdout as tqdm's; the next progress
        line a full interval after it."""
        print(text, flush=True)
        self.last = time.monotonic()


def _nonfinite_at_the_end(losses: list[float]) -> int:
    """How many of the last ``losses`` are non-finite, in a row: the count a checkpoint written
    before the trainer kept it resumes with (its recent losses reach further back than
    `NONFINITE_LOSSES_IN_ROW` steps)."""
    finite = [math.isfinite(loss) for loss in reversed(losses)]
    return finite.index(True) if True in finite else len(finite)


def _stop_message(trainer: Trainer, signum: int) -> str:
    """What a stop request says as it comes. A named run (`Trainer.run_name`) says its name and the
    step it saves: the workers of ``lowbit compare --jobs N`` each said the bare "interrupted:
    saving a checkpoint after this step", N times over, naming neither the run nor the step."""
    how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    again = "" if signum == signal.SIGTERM else " (Ctrl-C again to abort)"
    if trainer.run_name is None:
        return f"\n{how}: saving a checkpoint after this step{again}"
    return f"\n{how}: {trainer.run_name} saves a checkpoint after step {trainer.stop_step}{again}"


def _stop_message_of_another_rank(trainer: Trainer) -> str:
    """What rank 0 says as the ranks stop at a request that reached another rank first (a SIGTERM
    or SIGINT sent to that process): only rank 0 prints the stop message, so the run ended
    "(interrupted)" without a word of why. Whether the signal was that rank's alone rank 0 cannot
    know: a group's signal may reach it a moment later."""
    named = f"{trainer.run_name}: " if trainer.run_name else ""
    return (
        f"\n{named}another process of this run was asked to stop: "
        f"saving a checkpoint after step {trainer.step_idx}"
    )


@contextlib.contextmanager
def _stop_on_sigint(trainer: Trainer):
    """First Ctrl-C: finish the step, save, stop. Second: KeyboardInterrupt at once. The
    launcher's `lowbit.distributed.context.STOP_SIGNAL` asks for the first, however often it comes.

    So does a SIGTERM: it is how schedulers (Slurm, Kubernetes, systemd) end a job before a later
    SIGKILL, and how torchrun, itself stopped, stops its ranks (it SIGKILLs them after its
    ``--shutdown-timeout``); by default it killed the run without a checkpoint, losing the steps
    since the last save (a torchrun rank, or one process with ``--strategy``, kept the default).
    A rank of the `--nproc` launcher leaves SIGTERM to the launcher's handler
    (`lowbit.distributed.launch`): it calls this one as for `STOP_SIGNAL`, unless the launcher is
    aborting the ranks with it (a second Ctrl-C, a failed rank)."""
    from lowbit.distributed.context import STOP_SIGNAL, signals_handled

    # torchrun (its ranks in sessions of their own) passes its Ctrl-C on to them as SIGINT, and
    # its second one as the SIGTERM of its shutdown: after a SIGINT that SIGTERM is the second
    # Ctrl-C the stop message offers, and aborts, as it did when SIGTERM killed the ranks
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    first: list[int] = []  # the signal that asked for the stop

    def request_stop(signum) -> None:
        if not trainer.stop_requested:
            trainer.stop_requested = True
            trainer.stop_signal = signum
            first.append(signum)
            note_stopping()
            # every rank gets the Ctrl-C; one says so, unless it said why already (`_fit`)
            if trainer.dist.is_main and not trainer.stop_said:
                print(_stop_message(trainer, signum), file=sys.stderr)

    def handler(signum, frame):
        again = signum == signal.SIGINT or (
            signum == signal.SIGTERM and torchrun and first == [signal.SIGINT]
        )
        if trainer.stop_requested and again:
            trainer.abort_requested = True
            raise KeyboardInterrupt
        request_stop(signum)

    signals = [signal.SIGINT] + ([STOP_SIGNAL] if STOP_SIGNAL is not None else [])
    # the launcher's ranks have their handler already; a rank's own program may have its own too
    # (the `lowbit` command's, which stops as a Ctrl-C does where no run's steps handle it, is not)
    sigterm_free = signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, raise_terminated)
    if not trainer.dist.distributed or sigterm_free:
        signals.append(signal.SIGTERM)
    with signals_handled(handler, *signals):
        yield


def _under_torchrun(config: TrainConfig) -> TrainConfig:
    """Under torchrun the ranks train one run together: its world size is the run's process
    count and, unless a strategy was given, they use DDP (as ``--nproc`` does). Without this
    each rank trained a run of its own into the same folder. An ``nproc`` other than the world
    size and the default 1 was set for another count, which torchrun's replaced without a word."""
    from lowbit.distributed.context import torchrun_env

    if not torchrun_env():
        return config
    world = int(os.environ["WORLD_SIZE"])
    if config.nproc not in (1, world):
        raise UsageError(
            f"nproc {config.nproc}, but torchrun started {world} processes (WORLD_SIZE {world}); "
            f"fix: nproc {world}, or leave it at 1 (under torchrun its processes are the run's)"
        )
    if world == 1:
        return config
    return replace(config, nproc=world, strategy=config.strategy or "ddp")


def _with_run_data(config: TrainConfig) -> TrainConfig:
    """A resumed run's config whose relative --data path and --model folder, as the run recorded
    them, are the absolute paths they named from the folder the run was started in (run.json's
    data_path, model_path): from another folder the same relative path names other files, or
    none."""
    saved = read(config.out)
    if (saved.data, saved.model) != (config.data, config.model):  # check_resume_config refuses it
        return config
    return with_recorded_data(config.out, config)


def train(
    config: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    on_step=None,
) -> RunResult:
    """Train (or with ``resume``, continue) the run ``config`` describes, in ``config.out``.

    ``on_step(trainer)`` is called after every step (tests use it to interrupt or crash a run).
    Raises `UsageError` for bad input (before anything is written), `NonFiniteLoss` when a
    recipe that cannot skip steps meets a non-finite loss, and `RunNotWritten` when the run folder
    cannot be written (a full disk).
    """
    config = resolve(_under_torchrun(config))
    RunLock(Path(config.out)).refuse_held()  # a live run there: refused before the slow set-up
    check_run_dir(Path(config.out), resume, overwrite)  # fail before the slow set-up
    check_writable(config.out)  # /proc/x: a traceback where the folder was made
    if resume:
        config = _with_run_data(config)
    if config.strategy is not None:  # DDP/FSDP: spawned ranks, or this rank under torchrun
        from lowbit.distributed.launch import train as train_ranks

        return train_ranks(config, resume, overwrite, quiet, on_step)
    # a run refused once its task is built (its model folder, its conversion) says only why
    with warnings_held():
        trainer = Trainer(config, quiet=quiet, resume=resume)
    return trainer.fit(resume=resume, overwrite=overwrite, on_step=on_step)
