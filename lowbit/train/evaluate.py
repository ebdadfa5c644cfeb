"""Loading a trained run back (config, task, converted model, checkpoint) to evaluate or sample."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from lowbit.errors import UsageError, check_given, warn
from lowbit.train import checkpoint
from lowbit.train.config import (
    RUN_INFO,
    read,
    read_run_info,
    recipe_of,
    resolve,
    with_recorded_data,
)
from lowbit.train.runstate import state_note, unfinished_state
from lowbit.train.tasks import evaluated_whole
from lowbit.train.trainer import progress_bar, resolve_device


@dataclass
class LoadedRun:
    config: object
    task: object
    model: object
    precision: object
    checkpoint: Path
    step: int
    # where the run's latest checkpoint was taken (none given) and the run did not finish: its
    # state (`lowbit.train.runstate.unfinished_state`), as the warning of it says
    run_state: str | None = None


def load_run(run_dir, checkpoint_path: str | None = None, device: str | None = None) -> LoadedRun:
    """The run's model with its recipe's numerics and the weights of a checkpoint (default: latest)."""
    import lowbit
    from lowbit.infer import is_inference_dir, load_as_run
    from lowbit.train.tasks import build_task
    from lowbit.train.trainer import progress_bars_off

    if is_inference_dir(run_dir):  # a `lowbit quantize` / `lowbit prune` folder
        if checkpoint_path:
            raise UsageError(f"{run_dir} is a quantized/pruned folder; fix: drop --checkpoint")
        return load_as_run(run_dir, device)
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix == ".pt":  # a checkpoint where its run folder goes
        run = checkpoint.run_of(run_dir)  # in a run's checkpoints/, its file name picks it there
        hint = f"{run} --checkpoint {run_dir.name}" if run else f"RUN_DIR --checkpoint {run_dir}"
        raise UsageError(
            f"{run_dir}: a checkpoint file, not a run folder; fix: give its run folder, and the "
            f"file as --checkpoint ({hint})"
        )
    if not run_dir.is_dir():
        what = "a file, not a run folder" if run_dir.is_file() else "no such run folder"
        raise UsageError(
            f"{run_dir}: {what}; fix: give the --out folder of a run, or a folder that "
            "lowbit quantize/prune wrote"
        )
    config = with_recorded_data(run_dir, resolve(read(run_dir)))
    if device is not None:
        config = replace(config, device=device)
    check_has_checkpoint(run_dir, checkpoint_path, config)
    tries = 3
    for attempt in range(1, tries + 1):
        path = checkpoint.find(run_dir, checkpoint_path, note=False)  # said below
        try:
            state = checkpoint.load(path)
            break
        except UsageError:
            # a run still training with --keep-last deletes its older checkpoints as it saves a
            # new one: the latest picked may be gone when it is opened ("unreadable checkpoint
            # (No such file...)"), and the new one is the latest now. A given one is not replaced.
            if checkpoint_path or checkpoint.is_checkpoint(path) or attempt == tries:
                raise
    # the run's state worked out once: the warning and `lowbit eval --json`'s run_state agree
    info = read_run_info(run_dir)
    unfinished = None if checkpoint_path else unfinished_state(run_dir, info)
    if unfinished is not None:
        warn(state_note(run_dir, path, info, unfinished))
    target = resolve_device(config.device)
    with progress_bars_off(True):  # transformers' "Loading weights" bar
        task = build_task(config, run_dir=run_dir)
    precision = lowbit.Precision(recipe_of(config), device=target)
    model = precision.convert(task.model.to(target))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:  # missing, unexpected or differently shaped weights
        # the run's own checkpoint misfits when the --model folder it trained from changed since
        own = path.resolve().is_relative_to(run_dir.resolve())
        changed = own and config.model is not None and Path(config.model).is_dir()
        fix = (
            f"restore {config.model} as the run trained from it"
            if changed
            else ("give a checkpoint of this run")
        )
        raise UsageError(
            f"{path}: its weights do not fit the model of {run_dir} "
            f"({_misfit(model.state_dict(), state['model'], error)}); fix: {fix}"
        ) from None
    # weights that fit may still be loaded into another model (another rope_theta, hidden_act)
    checkpoint.check_model_folder(run_dir)
    check_own_checkpoint(run_dir, path, state.get("config"), config)  # fitting, yet another run's?
    precision.load_state_dict(state["precision"])
    return LoadedRun(config, task, model, precision, path, int(state["step"]), unfinished)


def check_has_checkpoint(run_dir: Path, checkpoint_path, config) -> None:
    """Refuse a run that has saved no checkpoint yet, saying why and what to run. The general
    "no checkpoint" error's fix, ``lowbit train --out RUN``, started a fresh run of the default
    settings (a causal LM) in the folder of a tagger that stopped before its first save, its
    run.json replaced, since such a run may be replaced without --overwrite. Where the run is
    known to be still training, or to have stopped (killed, failed: `lowbit.train.runstate`), the
    fix is the one that applies."""
    if checkpoint_path or checkpoint.latest(run_dir) is not None:
        return
    if not (run_dir / RUN_INFO).is_file():  # not a training run's folder: `checkpoint.find` says
        return
    from lowbit.train.runstate import state

    every = f"it saves every {config.save_interval} steps and at its end"
    again = f"start it again ({checkpoint.restart_command(run_dir)})"
    now = state(run_dir)
    if now == "running":
        raise UsageError(
            f"{run_dir}: the run is still training and has saved no checkpoint yet ({every}); "
            "fix: wait for its first"
        )
    if now not in ("killed", "failed", "diverged", "aborted"):  # cannot be told: both said
        raise UsageError(
            f"{run_dir}: the run has saved no checkpoint yet ({every}); fix: wait for its first "
            f"if it is still training, else {again}"
        )
    raise UsageError(
        f"{run_dir}: the run stopped ({now}) before it saved its first checkpoint ({every}); "
        f"fix: {again}"
    )


def check_own_checkpoint(run_dir, path, saved: dict | None, config) -> None:
    """Refuse a checkpoint of another run whose weights fit this run's model (the same
    architecture): they load without a complaint, and would be evaluated (or sampled) under this
    run's recipe and settings, in a report that names this run. A checkpoint is this run's when
    its settings are, but for those a resumed run may change (`lowbit train --resume`'s rule); a
    relative --data path or --model folder it holds is compared as the absolute one this run
    recorded."""
    from lowbit.train.trainer import changed_setting

    if not saved:  # written before checkpoints held their settings: nothing to compare
        return
    change = changed_setting(saved, config, read_run_info(run_dir))
    outside = Path(path).resolve().parent != (Path(run_dir) / "checkpoints").resolve()
    if not change and outside and _other_out(saved.get("out"), config.out):
        # `--out` is a setting a resume may change, but a checkpoint from outside this run's
        # folder that was written into another folder is another run's: the same model, data and
        # seed trained for other --steps was evaluated under this run's name
        change = ("out", saved.get("out"), config.out)
    if change:
        name, was, now = change
        raise UsageError(
            f"{path}: a checkpoint of another run ({saved.get('out')}: {name} {was!r}, "
            f"{run_dir}: {name} {now!r}); fix: give a checkpoint of {run_dir}, or that "
            "checkpoint's own run folder as RUN_DIR"
        )


def _other_out(saved: str | None, out: str | None) -> bool:
    """Whether a checkpoint's recorded run folder is not the run's (as written: both recorded
    the same way, ``~`` expanded)."""
    if not saved or not out:
        return False
    return os.path.normpath(os.path.expanduser(saved)) != os.path.normpath(os.path.expanduser(out))


def _misfit(expected: dict, given: dict, error: Exception) -> str:
    """What keeps a state dict from loading, in a few words."""
    missing, unexpected = set(expected) - set(given), set(given) - set(expected)
    if missing or unexpected:
        return f"{len(missing)} weights missing, {len(unexpected)} not in the model"
    shapes = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
    return shapes[0].rstrip(".") if shapes else type(error).__name__


def check_text_field(config, data: str | None, text_field: str | None) -> None:
    """`lowbit eval --text-field`: the field of the JSON records of ``data`` (a causal LM's
    `lowbit eval --data`), where it differs from the run's own --text-field (a JSONL file whose
    records name the text otherwise was refused, its fix naming a --text-field that eval did
    not take). Refused without --data (the run's own data is read with the run's field) and for
    another task; warned of as ignored for data that holds no JSON records."""
    from lowbit.train.config import without_jsonl

    if text_field is None:
        return
    check_given(text_field, "--text-field")
    if data is None:
        raise UsageError(
            f"--text-field {text_field} names the field of --data's JSON records, and no --data "
            "is given (the run's own data is read with its own field); fix: give --data PATH, "
            "or drop --text-field"
        )
    if config.task != "causal-lm":
        raise UsageError(
            f"--text-field applies to causal-lm runs, whose data may be JSON records, not to "
            f"task {config.task}; fix: drop --text-field"
        )
    if without := without_jsonl(data):
        warn(f"--text-field applies to JSONL data only, and {without}; ignored")


def check_same_data(run_dir, config, current: dict | None, evaluated=None) -> None:
    """Refuse to evaluate a run on other data than it trained on: its data path is read again,
    and the files there may have changed since (or a relative path may name another folder).
    ``evaluated``: the folder `lowbit eval` was given, whose fix also offers its ``--data``."""
    from lowbit.train.tasks import same_data, split_rule_note

    if not same_data(read_run_info(run_dir).get("data_fingerprint"), current):
        relative = config.data is not None and not Path(config.data).is_absolute()
        where = " (a relative path: from the folder the run was started in)" if relative else ""
        raise UsageError(
            f"{run_dir}: its data {config.data or '(built-in)'} holds other contents than the run "
            "trained on (the fingerprint in run.json differs); fix: restore the data the run "
            f"read{where}"
            + split_rule_note(config)
            + (_as_now(evaluated, config.data) if evaluated and config.data is not None else "")
        )


def _as_now(evaluated, data: str) -> str:
    """`check_same_data`'s other fix: the `lowbit eval` of ``data`` as it is now, shell-quoted
    (a glob was printed bare, for the shell to expand; a path with a space split in two). A
    file is evaluated whole (`evaluated_whole`), its training records too: said so."""
    whole = " (the whole file, the records it trained on too)" if evaluated_whole(data) else ""
    command = f"lowbit eval {shlex.quote(str(evaluated))} --data {shlex.quote(data)}"
    return f", or evaluate it as it is now{whole}: {command}"


# A whole split past this many batches takes minutes on a CPU (the built-in validation split is
# 14,325 batches of 4 x 16 tokens, 5 minutes and more for a small model): say how many, and
# that --max-batches bounds them, before the wait
LARGE_SPLIT_BATCHES = 100


def check_max_batches(max_batches: int | None) -> int | None:
    """``--max-batches`` as given, where it is a count: 0 is every batch of the split, in `lowbit
    eval` as in `lowbit prune` (whose default is the run's --eval-batches); a negative count is
    refused (it was a traceback from the data loader)."""
    if max_batches is not None and max_batches < 0:
        raise UsageError(
            f"--max-batches {max_batches} is negative; fix: use 1 or more, or 0 for every batch"
        )
    return max_batches


def eval_batch_count(task, split: str, max_batches=None) -> int:
    """The batches `Task.report` runs on ``split`` (`Task.eval_batch_count`; kept here, where
    callers of this module found it)."""
    return task.eval_batch_count(split, max_batches)


@contextlib.contextmanager
def eval_progress(task, models, split: str, max_batches=None, data: str | None = None):
    """Progress of an evaluation of ``split`` by ``models`` (each runs its batches once; a
    quantized folder's model and its reference are two): a note first where the whole split is
    large (naming the `lowbit eval --data` file or folder, ``data``, that stands in for it),
    then `lowbit train`'s progress on stderr (`progress_bar`): a bar on a terminal, a plain line
    at most once a minute in a log (which gets no carriage-return lines). It counts the
    models' forward calls, one a batch, through hooks that only count: the metrics are those of
    an evaluation without it. The hooks are removed after."""
    batches = eval_batch_count(task, split, max_batches)
    whole = data is not None and evaluated_whole(data)  # a file given: named, not the split
    if max_batches is None and batches > LARGE_SPLIT_BATCHES:
        both = ", through the model and its reference" if len(models) > 1 else ""
        what = evaluated_on(split, data) if whole else f"the whole {evaluated_on(split, data)}"
        print(
            f"lowbit: note: evaluating {what}: {batches:,} batches of "
            f"{task.config.batch_size}{both}; --max-batches N bounds it to N",
            file=sys.stderr,
        )
    named = Path(data).name if whole else split
    bar = progress_bar(batches * len(models), f"eval {named}", "batch")

    def count(*_) -> None:  # returns None: a forward hook's other value replaces the output
        bar.update(1)

    hooks = [model.register_forward_hook(count) for model in models]
    try:
        with bar:
            yield
    finally:
        for hook in hooks:
            hook.remove()


def evaluate_run(
    run_dir,
    split: str = "validation",
    checkpoint_path=None,
    max_batches=None,
    device=None,
    progress: bool = False,
    data: str | None = None,
    text_field: str | None = None,
) -> tuple[dict, str]:
    """Metrics and the printable report of a run's checkpoint on ``split``; with ``progress``
    (`lowbit eval` without --quiet), `eval_progress` on stderr meanwhile. ``data`` (`lowbit eval
    --data`): evaluate on that file (whole) or folder (its ``split``) instead of the run's data,
    with the run's tokenizer or vocabulary and tags (`Task.use_eval_data`); ``text_field``: its
    JSON records' field (`check_text_field`; default: the run's --text-field)."""
    if split not in ("train", "validation", "test"):
        raise UsageError(f"unknown split {split!r}; fix: use train, validation or test")
    max_batches = check_max_batches(max_batches) or None  # 0: the whole split, as left out
    from lowbit.infer import evaluate_inference_dir, is_inference_dir

    if is_inference_dir(run_dir):  # quantized/pruned: report the change against its source
        if checkpoint_path:
            raise UsageError(f"{run_dir} is a quantized/pruned folder; fix: drop --checkpoint")
        return evaluate_inference_dir(
            run_dir, split, max_batches, device, progress, data, text_field
        )
    run = load_run(run_dir, checkpoint_path, device)
    check_text_field(run.config, data, text_field)
    if data is None:
        check_same_data(run_dir, run.config, run.task.fingerprint, run_dir)
    else:
        run.task.use_eval_data(data, split, text_field)
    shown = eval_progress(run.task, [run.model], split, max_batches, data)
    with shown if progress else contextlib.nullcontext():
        metrics, text = run.task.report(run.model, run.precision, split, max_batches)
    head = (
        f"{run.config.task} {run.config.model}, recipe {run.config.recipe}, "
        f"{run.checkpoint.name} (step {run.step}), {evaluated_on(split, data)}"
    )
    unfinished = {"run_state": run.run_state} if run.run_state else {}  # as warned on stderr
    out = {"step": run.step, **unfinished, **data_fields(split, data), **metrics}
    return out, f"{head}\n{text}"


def evaluated_on(split: str, data: str | None) -> str:
    """What an evaluation ran on, for its report's head: the run's ``split``, or that of the
    `lowbit eval --data` folder or glob, or the file given, whole (`evaluated_whole`)."""
    if data is None:
        return f"{split} split"
    return f"{data} (whole file)" if evaluated_whole(data) else f"{split} split of {data}"


def data_fields(split: str, data: str | None) -> dict:
    """The `lowbit eval --json` keys of what was evaluated: ``split``, and ``data`` where given
    (a file evaluated whole has no split: null, `evaluated_whole`)."""
    if data is None:
        return {"split": split}
    return {"data": data, "split": None if evaluated_whole(data) else split}
