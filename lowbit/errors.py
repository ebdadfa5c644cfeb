"""User-facing errors.

A `UsageError` is a problem with the user's input (a flag, a file, a config). The CLI prints it as one
line, ``lowbit: error: <message>``, and exits with status 2. Its message names the problem and the
fix. Anything else that escapes is a bug and keeps its traceback.
"""

import contextlib
import os
import signal
import sys
import threading
from enum import Enum
from pathlib import Path


class UsageError(ValueError):
    """Bad input from the user: one line that names the problem and how to fix it."""


class RunNotWritten(RuntimeError):
    """A run folder could not be written while training (a checkpoint, the metrics): a full disk,
    a folder made read-only. The run stops; its last complete checkpoint is intact. Every command
    prints it in one line and exits 1.

    Its parts: ``problem`` (the run, the step, what is kept), ``remedy`` (free disk space, say) and
    ``then``, the command that goes on; a caller that goes on otherwise (`lowbit compare`, which
    resumes the whole study) says so with `going_on_by`. Kept as the exception's args, so that it
    crosses from a worker process whole."""

    def __init__(self, problem: str, remedy: str | None = None, then: str | None = None):
        super().__init__(problem, remedy, then)
        self.problem, self.remedy, self.then = problem, remedy, then

    def __str__(self) -> str:
        return self.going_on_by(self.then)

    def going_on_by(self, then: str | None) -> str:
        """The one line, with ``then`` as the command that goes on (the problem alone where the
        error was made with no remedy)."""
        if self.remedy is None:
            return self.problem
        return f"{self.problem}; fix: {self.remedy}" + (f", then {then}" if then else "")


class Terminated(KeyboardInterrupt):
    """A SIGTERM (how Slurm, Kubernetes, systemd and ``timeout`` end a job) where a Ctrl-C would
    raise KeyboardInterrupt: outside a run's steps, which save and stop on it, it stops the
    command as a Ctrl-C does there, and the command's line names it. With SIGTERM's default action
    a command still starting died without a line."""


# Whether this command is stopping (`note_stopping`).
_stopping = False


def note_stopping() -> None:
    """This process is stopping: a run of its was asked to save and stop (a Ctrl-C, a SIGTERM), or
    a SIGTERM raised `Terminated`. `raise_terminated` lets a later SIGTERM pass."""
    global _stopping
    _stopping = True


def reset_stopping() -> None:
    """This process is not stopping (any more): a study starts (`lowbit.report.parallel.train_runs`).
    In a program that imports lowbit an earlier stop (a Ctrl-C'd run or study) left it stopping
    for good, and a SIGTERM to a later study was let pass (`raise_terminated`): it trained on."""
    global _stopping
    _stopping = False


def stopping() -> bool:
    """Whether this process is stopping (`note_stopping`)."""
    return _stopping


def raise_terminated(signum, frame) -> None:
    """The ``lowbit`` command's SIGTERM handler (`stop_on_sigterm`). A SIGTERM that comes once the
    command is stopping (Slurm's to the process group and a ``kill`` of the process, 0.3 s apart)
    is let pass, as during a run's save: a run's steps restore this handler as they end, and the
    second killed the run as it summed up (no summary, no resume line, run.json "running"), or
    raised again as the command reported the first (a traceback, exit 1)."""
    if not _stopping:
        note_stopping()
        raise Terminated


def stop_on_sigterm() -> None:
    """In the ``lowbit`` command's process, from its first import on: a SIGTERM raises
    `Terminated`. One ignored as the process started (the job's own choice) stays ignored."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, raise_terminated)


@contextlib.contextmanager
def stops_held(held: bool = True):
    """Within (with ``held``): a Ctrl-C or a SIGTERM that would stop the command is noted, not
    raised, and stops it as usual once the block ends; a second one ends the process at once, in
    the command's line and status 130. For the ``lowbit`` command's import of torch, which runs
    C++ that imports Python modules and cannot hand an exception back (``torch._C._c10d_init``,
    ``_multiprocessing_init``, ``_dist_autograd_init``): a Ctrl-C raised there aborted the process
    ("terminate called after throwing an instance of 'pybind11::error_already_set'", status 134,
    no line), and one in numpy's C start-up left numpy half-made (a traceback ending in
    "ImportError: cannot load module more than once per process"). Blocked instead, the signals
    left a slow or stuck import (a cold network file system) deaf to every Ctrl-C, and a Ctrl-C
    and a SIGTERM let through together raised the second in the report of the first (a
    traceback). The second ends the process without raising (``os._exit``): an exception could
    land in that C++. Only signals whose handler raises are noted: one ignored stays ignored, and
    a default SIGTERM (a worker the command spawned) still kills."""
    if not held or threading.current_thread() is not threading.main_thread():
        yield  # a handler can only be set from the main thread
        return
    noted: list[int] = []

    def note(signum, frame) -> None:
        if noted:
            os.write(2, f"{_stop_line(signum)}\n".encode())
            os._exit(130)
        noted.append(signum)

    raising = (signal.default_int_handler, raise_terminated)
    previous = {
        signum: signal.getsignal(signum)
        for signum in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(signum) in raising
    }
    for signum in previous:
        signal.signal(signum, note)
    try:
        yield
    finally:
        _set_handlers(list(previous.items()))
    if noted:
        previous[noted[0]](noted[0], None)  # raises, as the signal would have


def _set_handlers(handlers: list) -> None:
    """Set each ``(signum, handler)`` of ``handlers``, the rest in a ``finally`` of the first: a
    signal that raises as soon as its own handler is back (a Ctrl-C once SIGINT's is) left the
    others on `stops_held`'s ``note``: a later SIGTERM was noted and lost, or ended the process."""
    if not handlers:
        return
    (signum, handler), *rest = handlers
    try:
        signal.signal(signum, handler)
    finally:
        _set_handlers(rest)


def _stop_line(signum: int) -> str:
    """The command's line for a stop by the signal ``signum``."""
    return interrupted_line(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


def interrupted_line(error: BaseException) -> str:
    """The command's line for an interrupt that stopped it (`is_interrupt`)."""
    terminated = isinstance(error, Terminated) or isinstance(error.__cause__, Terminated)
    return f"lowbit: {'terminated (SIGTERM)' if terminated else 'interrupted'}"


def choose(kind: str, name: str, valid, fix: str | None = None) -> None:
    """Raise a `UsageError` unless ``name`` is one of ``valid``; the message lists the valid names,
    then ``fix`` (the flag to give, e.g. ``--task causal-lm``) where there is one."""
    valid = list(valid)
    if name not in valid:
        kinds = f"{kind[:-1]}ies" if kind.endswith("y") else f"{kind}s"  # strategies
        fix = f"; fix: {fix}" if fix else ""
        raise UsageError(f"unknown {kind} {name!r}; valid {kinds}: {', '.join(valid)}{fix}")


def member(kind: type[Enum], value, field_name: str) -> Enum:
    """``value`` as a member of the enum ``kind``; a `UsageError` listing the valid values."""
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(m.value for m in kind)
        raise UsageError(f"unknown {field_name} {value!r}; valid: {valid}") from None


def file_in_the_way(path) -> Path | None:
    """The file at ``path`` or at a folder above it that keeps a folder from being made there
    (an ``--out`` named after a file, or below one); None when there is none."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def check_writable(out, flag: str = "--out") -> None:
    """Refuse, before a command's slow work rather than after it, an output folder that cannot
    be made or written in: no permission, a read-only file system, or /proc (whose ENOENT the CLI
    keeps as a bug's traceback). Tried by making, and removing, an empty folder in the nearest
    folder of the path that exists; nothing is left behind. A full disk keeps its `OSError`,
    which the CLI reports in its own line (status 1)."""
    import errno
    import tempfile

    out = Path(out)
    there = next(p for p in (out, *out.parents) if p.exists())  # /proc of /proc/x/y
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lowbit-check-", dir=there))
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        what = "nothing can be written in" if there == out else "no folder can be made in"
        reason = error.strerror or type(error).__name__
        raise UsageError(
            f"{flag} {out}: {what} {there} ({reason}); fix: choose a folder you may write to"
        ) from None


def a_task_run(task: str) -> str:
    """ "a causal-lm run", "an image-classification run": a run named by its task in a message."""
    return f"{'an' if task[:1] in tuple('aeiou') else 'a'} {task} run"


def check_given(value, name: str, fix: str = "give its value (a shell variable unset?)") -> None:
    """Refuse an empty path or name (an unset shell variable: ``--out "$DIR"``), which as a path is
    the current folder: read as the model or data, or written (and with ``--force`` or
    ``--overwrite`` cleared) as the output, in place of the folder meant. ``None`` (not given)
    passes."""
    if value is not None and not str(value).strip():
        raise UsageError(f"{name} is an empty string; fix: {fix}")


def pipe_as_data(path, what: str = "text") -> UsageError:
    """The refusal of a data path that exists but is neither a file nor a folder: a pipe (the
    shell's ``<(zcat x.gz)``) or a device, read once and then gone, where a run reads its data
    again to evaluate or resume. (Reported as missing, it sent the user looking for a typo.)"""
    return UsageError(
        f"{path}: not a regular file or folder but a pipe or device, which cannot be read again "
        f"to evaluate or resume the run; fix: save the {what} to a file and give its path"
    )


def is_interrupt(error: BaseException) -> bool:
    """Whether ``error`` is a Ctrl-C: a KeyboardInterrupt, or the error Python raises in its place
    where one lands in a class's ``__set_name__`` (Python 3.11: "RuntimeError: Error calling
    __set_name__ ...", the KeyboardInterrupt its cause; a Ctrl-C at the command's start-up met one
    in `platform`'s class ``uname_result`` as torch imports it)."""
    return isinstance(error, KeyboardInterrupt) or isinstance(error.__cause__, KeyboardInterrupt)


def warn(line: str) -> None:
    """``lowbit: warning: line`` on stderr, from rank 0 only (``RANK``; every process of a run
    alone): each rank of a distributed run meets the same data and settings, and said it again.
    Within `warnings_held`, held as `note_later`'s notes are, until the command is past its
    refusals."""
    if _silenced:
        return
    if _holding_warnings:
        _hold(f"lowbit: warning: {line}")
    else:
        _say(f"lowbit: warning: {line}")


def warn_once(line: str) -> None:
    """`warn`, unless this process printed ``line`` already (`lowbit compare` trains many runs of
    one data; a file is read more than once per run: its fingerprint, its task). Said means
    printed: a warning held (`warnings_held`) and dropped with a refused command is said by the
    next command that meets it. Until session 42 each module kept a set of its own, which
    counted a warning held as said: dropped with a refusal, it never came again in the process."""
    if f"lowbit: warning: {line}" not in _said:
        warn(line)


_held_notes: list[str] = []  # the lines held, "lowbit: note: ..." or "lowbit: warning: ..."
_holding_warnings = False  # within `warnings_held`, until `say_held_notes`
_silenced = False  # within `warnings_silenced`
_said: set[str] = set()  # the warnings printed by this process (`warn_once`)


def _say(text: str) -> None:
    """Print ``text`` on stderr from rank 0 only (as `warn`); a warning counts as said
    (`warn_once`) on every rank."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr)
    if text.startswith("lowbit: warning: "):
        _said.add(text)


def _hold(text: str) -> None:
    if text not in _held_notes:
        _held_notes.append(text)


def note_later(line: str) -> None:
    """Hold ``lowbit: note: line`` until the command is past its refusals (`say_held_notes`): a
    note of a setting the command chose (a --model folder's shorter sequence length) came before
    the one-line error of a run then refused (its folder's weights torn). A note held again (each
    recipe of a compare study resolves the same default) is said once."""
    _hold(f"lowbit: note: {line}")


def say_held_notes() -> None:
    """Print the notes `note_later` held, and the warnings `warnings_held` held, once, in the
    order they came, from rank 0 only (as `warn`); later warnings are printed as they come."""
    global _holding_warnings
    _holding_warnings = False
    while _held_notes:
        _say(_held_notes.pop(0))


def drop_held_notes() -> None:
    """Forget the notes of a command that ended (refused): the next command in the process (a
    test's, a program's) says its own."""
    global _holding_warnings
    _holding_warnings = False
    _held_notes.clear()


@contextlib.contextmanager
def warnings_held():
    """Within: `warn`'s warnings are held with `note_later`'s notes until `say_held_notes`, which
    the command calls once past its refusals (the trainer's, once its model is converted), and
    dropped where the block raises: a refused command prints its one-line error alone. Until
    session 42 the doctor's notes and the warnings of its settings came before the error of a
    refusal that needs the built model (`lowbit doctor`'s override that applies to no layer; FSDP
    splitting the 8-bit optimizer states' blocks). The warnings of the data and the --model
    folder, read as the task is built, are not held (`warnings_as_they_come`)."""
    global _holding_warnings
    _holding_warnings = True
    try:
        yield
    except BaseException:
        drop_held_notes()
        raise
    say_held_notes()


@contextlib.contextmanager
def warnings_as_they_come():
    """Within (a part of a `warnings_held` block): `warn` prints as it comes, then holds again as
    before. The trainer builds its task (reads the data) so: a warning of the data may explain a
    refusal of it (a folder's compressed file not read, then its train split empty), which held,
    was dropped with it (session 42)."""
    global _holding_warnings
    holding, _holding_warnings = _holding_warnings, False
    try:
        yield
    finally:
        _holding_warnings = holding


@contextlib.contextmanager
def warnings_silenced():
    """Within: `warn`'s warnings are neither printed nor held, nor said (`warn_once`): a check
    that reads the data as the run will (`lowbit.train.tasks.check_inputs`, in the launcher of
    ranks that read it again) leaves the run to say them."""
    global _silenced
    silenced, _silenced = _silenced, True
    try:
        yield
    finally:
        _silenced = silenced
