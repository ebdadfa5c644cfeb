"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard event files, optional W&B (offline).

Each record is ``{"step", "split", <metric>: value, ...}``; TensorBoard gets ``<split>/<metric>``.
On resume, records after the resumed step are dropped from ``metrics.jsonl`` and TensorBoard is
opened with ``purge_step`` so the curves have no duplicate tail.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings
from pathlib import Path

from lowbit.errors import warn

METRICS = "metrics.jsonl"
WANDB_RUN_ID = "lowbit_run_id"  # in the run folder's wandb/: the W&B run a resume continues


class MetricsLogger:
    def __init__(
        self,
        run_dir,
        config: dict,
        resume_step: int | None = None,
        wandb: bool = False,
        quiet: bool = False,
    ):
        self.path = Path(run_dir) / METRICS
        if resume_step is not None:
            _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter
        # TensorBoard hides the events from purge_step on: the resumed run's first step, not the
        # checkpoint's, whose records (kept in metrics.jsonl too) were written before it was saved
        purge_step = None if resume_step is None else resume_step + 1
        tensorboard = Path(run_dir) / "tensorboard"
        if resume_step is not None:
            _after_earlier_event_files(tensorboard)
        _quiet_event_writer_threads()
        self._tb = SummaryWriter(str(tensorboard), purge_step=purge_step)
        self._wandb = _start_wandb(run_dir, config, resume_step, quiet) if wandb else None

    def log(self, step: int, split: str, metrics: dict) -> None:
        # an evaluation's metric that does not apply (entity F1 of a split without entities) is
        # written null, as `lowbit eval --json` writes it; a train record leaves a None out
        kept = {k: v for k, v in metrics.items() if v is not None or split == "validation"}
        values = {k: _number(v) for k, v in kept.items()}
        written = {k: json_number(v) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, "split": split, **written}) + "\n")
        # TensorBoard and W&B take inf and NaN as numbers (a diverged loss, an SQNR of inf): only
        # the JSON line spells them as strings
        for name, value in values.items():
            if isinstance(value, int | float):
                self._tb.add_scalar(f"{split}/{name}", value, step)
        if self._wandb is not None:
            wandb_values = {f"{split}/{k}": v for k, v in values.items() if v is not None}
            failed = f"failed logging step {step}", "the run goes on without it"
            self._to_wandb(failed, self._wandb.log, wandb_values, step=step)

    def flush(self) -> None:
        self._file.flush()
        self._tb.flush()

    def close(self, quietly: bool = False, aborted: bool = False) -> None:
        """``quietly``: as the run stops on an error, a failed write of the buffered records is
        not raised: on a full disk it would replace the error that says what stopped the run (and
        the records after the last checkpoint are dropped on resume anyway); the W&B run is
        marked failed (exit code 1), where it read "finished" whatever stopped it.

        ``aborted`` (with ``quietly``): the user stopped the run (a second Ctrl-C, a
        KeyboardInterrupt), which is no error of the run's: its W&B run is finished (exit code 0)
        as a run stopped by one Ctrl-C is. W&B's finish knows only finished (0) and failed (any
        other code); run.json says "aborted"."""
        failures = (OSError,) if quietly else ()
        with contextlib.suppress(*failures):
            self._file.close()
        with contextlib.suppress(*failures):
            self._tb.close()
        if self._wandb is not None:
            failed = "failed to finish", "the run's own files are complete"
            self._to_wandb(failed, self._wandb.finish, exit_code=int(quietly and not aborted))
            self._wandb = None  # finished: not again

    def _to_wandb(self, failed: tuple[str, str], call, *args, **kwargs) -> None:
        """``call(*args, **kwargs)``, a call of the W&B run's (log, finish); one that fails is
        warned of once, by ``failed`` (what failed, what happens now), and W&B left out from then
        on. It raised into the trainer: a run stopped with W&B's traceback and was marked failed,
        where its checkpoints and metrics.jsonl were fine (a completed run's, of a finish that
        failed). W&B is a copy of what metrics.jsonl and TensorBoard hold: the run does without."""
        try:
            call(*args, **kwargs)
        except Exception as error:
            self._wandb = None
            what, now = failed
            _warn_wandb(
                f"W&B {what} ({_gist(error)}); {now}, W&B keeping what it logged before",
                f"see the logs in {self.path.parent / 'wandb'} for why",
            )


def _quiet_event_writer_threads() -> None:
    """Keep `threading.excepthook` from printing the error of TensorBoard's writer thread.

    TensorBoard writes its event file from a thread of its own: a write that fails there (a full
    disk between two checkpoints) ended the thread with a 15-line traceback, then the next record
    or flush raised the same error in the run's thread, which the trainer reports in lowbit's one
    line (`RunNotWritten`). The hook in place is wrapped to pass over that thread's `OSError`, so
    the error is said once; any other thread's error, and any other error of that thread, still
    reaches it. Wrapped once: a hook already wrapped is left as it is."""
    hook = threading.excepthook
    if getattr(hook, "quiet_event_writer", False):
        return

    def excepthook(args) -> None:
        writer = type(args.thread).__module__ == "tensorboard.summary.writer.event_file_writer"
        if not (writer and issubclass(args.exc_type, OSError)):
            hook(args)

    excepthook.quiet_event_writer = True
    threading.excepthook = excepthook


def _after_earlier_event_files(folder: Path) -> None:
    """Wait (under a second) until a new event file's name sorts after every one in ``folder``.
    TensorBoard reads a run's event files in name order, and its purge of the steps a resumed run
    writes again works only on files read before the resumed one. A name is
    ``events.out.tfevents.<second>.<host>.<pid>.<counter>``, compared as text: a writer opened in
    the second of an earlier one (a resume right after a crash) could sort first (pid "1000"
    before "999", counter "10" before "9"), and the crashed run's later steps stayed in the
    curves beside the resumed run's (a test caught it now and then)."""
    seconds = [
        int(parts[3])
        for path in folder.glob("events.out.tfevents.*")
        if len(parts := path.name.split(".")) > 3 and parts[3].isdigit()
    ]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)


class NullLogger:
    """The logger of ranks other than 0 in a multi-process run: records nothing."""

    def log(self, step: int, split: str, metrics: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, quietly: bool = False, aborted: bool = False) -> None:
        pass


def _number(value):
    return float(value) if hasattr(value, "item") else value


def json_number(value):
    """``value`` as metrics.jsonl (and ``lowbit eval --json``) write it: NaN and inf as the
    strings "nan" and "inf" (JSON has neither, and a bare NaN breaks strict parsers), a dict's
    values alike."""
    if isinstance(value, dict):
        return {key: json_number(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                # a kill between a record and its line feed (a buffer flushed in two writes) left
                # a whole record without one, which the resumed run's first record joined
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def _start_wandb(run_dir, config: dict, resume_step, quiet: bool = False):
    """The W&B run (offline) of the run folder ``run_dir``; None without the wandb package.

    A resumed run continues the W&B run its folder started, by the id kept in
    ``wandb/lowbit_run_id``: wandb gave each ``wandb.init`` a new id, so every resume was a run of
    its own in W&B, and ``wandb sync RUN/wandb`` uploaded one run in pieces (with one id it
    uploads the pieces into one run, in order). W&B's own lines are cut to the few that say where
    the run is kept (its closing history repeated lowbit's summary), and to none with ``quiet``."""
    try:
        import wandb
    except ImportError:
        missing = "the wandb package is not installed; logging without it"
        warn(f"--wandb: {missing} (fix: pip install wandb)")
        return None
    except Exception as error:  # an install that fails to import (a protobuf too new for it)
        _warn_wandb(f"the wandb package does not import ({_gist(error)}); logging without it")
        return None
    id_file = Path(run_dir) / "wandb" / WANDB_RUN_ID
    run_id = None
    if resume_step is not None and id_file.is_file():
        run_id = id_file.read_text(encoding="utf-8").strip() or None
    try:
        run = wandb.init(
            mode="offline",
            dir=str(run_dir),
            config=config,
            name=Path(run_dir).name,
            id=run_id,
            resume="allow" if resume_step is not None else None,
            settings=wandb.Settings(quiet=True, silent=quiet),
        )
    except Exception as error:
        # Warned of, not raised: the start evaluation has run and the run folder is set up, and a
        # W&B setting in the environment (WANDB_MODE=bogus), an unwritable RUN/wandb or a wandb
        # without these settings stopped the run there with W&B's traceback
        _warn_wandb(
            f"W&B did not start ({_gist(error)}); logging without it",
            "check the WANDB_* environment variables (unset a wrong one) and that "
            f"{id_file.parent} is writable, update wandb (pip install -U wandb), or drop --wandb",
        )
        return None
    if run_id is None:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(f"{run.id}\n", encoding="utf-8")
    return run


def _warn_wandb(problem: str, fix: str = "pip install -U wandb, or drop --wandb") -> None:
    """One line on W&B failing, after which the run logs to metrics.jsonl and TensorBoard."""
    warn(f"--wandb: {problem}; fix: {fix}")


def _gist(error: Exception) -> str:
    """``error`` in a few words: its type and first line (W&B's errors run to many lines)."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
