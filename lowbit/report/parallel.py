"""Train the runs of compare studies in parallel worker processes (`lowbit compare --jobs`).

A tiny model's training step does not keep several cores busy (the parity study's causal LM runs
one thread per run), so a study on an N-core machine finishes sooner with N runs at a time, each
in its own process with its own threads, than one run after another. Every run is the same run a
sequential study trains (`run_one`: same settings, seed and folder; results do not depend on which
worker trains it, only on the thread count, which every worker shares), so a study can be started
with any number of jobs and continued with another. Workers are started with ``spawn``: a fresh
interpreter per worker, not a fork of a process whose PyTorch thread pools are running.

The longest runs should come first in ``runs`` (a queue of longest-first jobs finishes closest to
the ideal). Ctrl-C reaches the workers too (one process group): each interrupted run leaves its
checkpoint, and the next invocation resumes it; a SIGINT sent to this process alone is passed on
to the workers as a stop request (`_ask_to_stop`), with the same result. A worker still starting
holds either until it can handle it (`_held_while_workers_start`): the study stops once its
workers have started, quietly. This process says the study's last line after every worker has
ended (the pool's shutdown waits for them). A run that fails stops the others the same way but
quietly (an event the workers read after each step, `_failed`): each says where it stopped, in
one line. A worker killed outright (SIGKILL, the out-of-memory killer) breaks the pool, which
stops the others with a SIGTERM (each saves its step): the study's error names the run whose
worker died (`_killed`), and the same command goes on. Not a new pool for the runs left: what
killed the worker (memory) kills the next at the same --jobs, and the study cannot report without
the run that died; every run's checkpoint is kept for the rerun, at a lower --jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from itertools import takewhile
from pathlib import Path

from lowbit.distributed.context import (
    STOP_SIGNAL,
    progress_bars_lock_threads_only,
    signals_handled,
)
from lowbit.errors import UsageError, note_stopping, raise_terminated, reset_stopping


def default_threads(jobs: int) -> int:
    """Threads per worker: the machine's cores shared out between ``jobs`` workers."""
    return max(1, (os.cpu_count() or 1) // jobs)


# In a worker: a stop was asked (by `_ask_to_stop`, or a Ctrl-C that interrupted a run), so the
# runs still queued to this worker do not start. Whether a run is in progress, and the step it
# stopped at for another run's failure.
_stopped = False
_running = False
_stopped_at: int | None = None
# In a worker: the study's event, set when one of its runs failed (`_failed`). Not a signal: the
# trainer's `STOP_SIGNAL` says "interrupted: saving a checkpoint", as for a Ctrl-C nobody pressed,
# and any signal kills a worker still starting (its handlers are not installed yet). The worker
# stops its run after the step in progress (`_stop_after_step`) and tells the study at which step
# (`Stopped`).
_failure = None


class Stopped(Exception):
    """A worker's answer for a run that stopped because another run failed: ``step``, the step
    whose checkpoint it saved, or None when it had not started."""

    def __init__(self, step: int | None):
        super().__init__(step)  # as the args: it crosses back from the worker whole
        self.step = step


def _failed() -> bool:
    """Whether another run of the study failed (`_failure`)."""
    return _failure is not None and _failure.is_set()


WARNING = "lowbit: warning: "


def _is_indented(line: str) -> bool:
    return line[:1] in (" ", "\t")


class _WarnedOnce:
    """A text stream (stderr) that passes on every line but a ``lowbit: warning:`` said before by
    any process of the study: each process says a data warning once (`lowbit.errors.warn`, the
    tasks' own), and with --jobs N every worker loads the data and said it again, N times over,
    and the study's process once more as it read the finished runs' data. The warnings said are
    files named by their hash in ``folder``, created exclusively: the first process to create one
    says the warning.

    A multi-line warning (indented lines after its first) is left out whole, and only its own
    lines are: a warning is its first line with the indented lines that came in the same write
    (one ``print``, as the trainer says one), one file, so a worker whose warning has other lines
    says it. An indented line written after that is said once as the warning so far (its lines
    up to this one), and always by the process that said the warning: a worker's line of its own
    that follows a warning said before (progress, an error's detail) is new and passes on, where,
    taken for the warning's by its indentation alone, it was lost. The same text is judged the
    same however it is cut into writes: a warning said whole marks its shorter forms (its first
    line, ...) said too, for a process that writes it line by line; a line still being written
    waits for its end, and a flush judges it as it is then (its rest going the same way)."""

    def __init__(self, stream, folder: str):
        self.stream, self.folder, self.pending = stream, folder, ""
        # the warning whose indented lines may follow (its lines so far), None after other lines
        self.warning: str | None = None
        self.said_warning = False  # whether this process said it (and so says its lines)
        self.covered = 0  # its indented lines still to come that were part of it when judged
        # a warning's line judged before its end (at a flush): whether the rest of it is said;
        # None at the start of a line
        self.said_line: bool | None = None

    def write(self, text: str) -> int:
        self.pending += text
        self._say(flushing=False)
        return len(text)

    def _say(self, flushing: bool) -> None:
        """Pass on or leave out each line of ``pending``; a warning (or its line) whose end is
        still to come waits for it, unless ``flushing``: then it is judged as it is, and the rest
        of it, when it comes, goes where it went (`said_line`)."""
        while self.pending:
            line, newline, rest = self.pending.partition("\n")
            if self.said_line is not None:  # the rest of a line judged at a flush
                if self.said_line:
                    self.stream.write(line + newline)
                self.said_line = None if newline else self.said_line
                self.pending = rest
                continue
            ends = bool(newline) or flushing
            say = True
            indented = _is_indented(self.pending)
            if indented and self.warning is not None:  # the warning's line, or another's
                if not ends:
                    break
                if self.covered:  # said or left out with the warning's first line
                    self.covered -= 1
                    say = self.said_warning
                else:
                    self.warning += "\n" + line
                    say = self._first(self.warning) or self.said_warning
            # a warning, or the start of one still being written (at a flush, the start of any
            # line but a warning is said as it is, as every other line is)
            elif not indented and (
                line.startswith(WARNING) or (not ends and WARNING.startswith(line))
            ):
                # its indented lines of the same write (one print: the last one's newline comes
                # in the next write, so a line still being written waits for it, to be judged
                # whole, as a process that wrote it whole judges it)
                lines = rest.split("\n")
                follows = list(takewhile(_is_indented, lines))
                if not ends or (len(follows) == len(lines) and not flushing):
                    break
                self.warning, self.covered = "\n".join([line, *follows]), len(follows)
                self.said_warning = say = self._first(self.warning)
                # its shorter forms too, as a process that writes its lines one write each
                # judges them: that one says it again otherwise
                for end in range(len(follows) if say else 0):
                    self._first("\n".join([line, *follows[:end]]))
            else:  # not a warning (nor a line of one): as it is
                self.warning = None
            if say:
                self.stream.write(line + newline)
            if not newline and self.warning is not None:
                self.said_line = say
            self.pending = rest

    def _first(self, text: str) -> bool:
        name = hashlib.sha256(text.encode()).hexdigest()
        try:
            os.close(os.open(os.path.join(self.folder, name), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        except OSError:  # the folder is gone (the study ended): say it rather than lose it
            pass
        return True

    def flush(self) -> None:
        self._say(flushing=True)
        self.stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding: the stream's
        return getattr(self.stream, name)


_warned: str | None = None  # the study's folder of lines said (`warnings_once`), in this process


@contextlib.contextmanager
def warnings_once():
    """Within: every ``lowbit: warning:`` line is said once by this process and the --jobs
    workers it starts (`train_runs`) together (`_WarnedOnce`). Nested: the outer one's."""
    global _warned
    if _warned is not None:
        yield
        return
    stream = sys.stderr
    with tempfile.TemporaryDirectory(prefix="lowbit-warned-") as folder:
        _warned, sys.stderr = folder, _WarnedOnce(stream, folder)
        try:
            yield
        finally:
            sys.stderr.flush()
            _warned, sys.stderr = None, stream


# The signals a worker handles as a stop request (`_stop`), held pending while it starts
_STOPS = {signal.SIGINT} | ({STOP_SIGNAL} if STOP_SIGNAL is not None else set())
# Blocked while the pool starts: `_STOPS`, and SIGPIPE, for good in the pool's own threads
# (`_held_while_workers_start`)
_HELD = _STOPS | ({signal.SIGPIPE} if hasattr(signal, "SIGPIPE") else set())


@contextlib.contextmanager
def _held_while_workers_start():
    """Within: the workers started (spawned) start with `_STOPS` blocked, held pending until
    `_start_worker` handles them. A spawned worker imports the main module again (parity.py, the
    ``lowbit`` script: torch, seconds): a Ctrl-C then printed each worker's KeyboardInterrupt
    traceback through those imports, and a stop request sent to this process alone
    (`_ask_to_stop`) killed the workers still starting (SIGUSR1's default action), which broke
    the pool, and ``lowbit compare`` died of SIGPIPE (its default in the command) as the pool
    shut down, with no line of its own. A mask is what a spawned process inherits (not a
    handler); multiprocessing's resource tracker starts the same way (bpo-33613), and it is
    started first, as starting it unblocks them here.

    SIGPIPE is blocked too, and stays blocked in the threads the pool starts meanwhile (its
    manager thread, and the feeder thread of its queue of runs, which inherit this thread's
    mask): after a worker died (SIGKILL, the out-of-memory killer) the pool closes its end of
    that queue and ends the other workers, and the feeder's next write (the workers' "stop"
    sentinels) went to a pipe no process read. In ``lowbit compare``, whose SIGPIPE is the
    default action (`lowbit.cli.main`, for ``lowbit recipes | head``), that killed the study
    without a line; blocked, the write fails with EPIPE, which the pool ignores. This thread's
    own writes (the progress lines to a closed ``| head``) are as before, its mask restored."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no SIGUSR1 stop, no masks
        yield
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_worker(failure=None, warned: str | None = None) -> None:
    """Set up a worker for its lifetime: a stop request (`_ask_to_stop`, a Ctrl-C of the process
    group) that reaches it between runs, idle and waiting for its next, marks the worker stopped.
    Handled only while a run was in progress, it killed an idle worker (SIGUSR1's default), or
    raised KeyboardInterrupt in the pool's idle loop, which printed a traceback under the one-line
    error of the run that stopped the study. One that came while the worker started, held till
    now (`_held_while_workers_start`), is handled as its handler is set. ``warned``: the study's
    folder of warnings said (`warnings_once`)."""
    global _failure
    _failure = failure
    if warned is not None:
        sys.stderr = _WarnedOnce(sys.stderr, warned)
    progress_bars_lock_threads_only()  # a worker killed leaves no semaphore behind
    for signum in _STOPS:
        signal.signal(signum, _stop)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


def _stop(signum, frame) -> None:
    """The parent's stop request, or a Ctrl-C, outside a training loop (a trainer handles either
    as Ctrl-C's first press, `lowbit.train.trainer._stop_on_sigint`): no run starts after it, and
    the run being set up stops."""
    global _stopped
    _stopped = True
    if _running:
        raise KeyboardInterrupt


def _stop_after_step(trainer) -> None:
    """`Trainer.fit`'s ``on_step`` in a worker: after another run's failure, stop as a first
    Ctrl-C does (this step's checkpoint saved), without the trainer's "interrupted" line."""
    global _stopped_at
    if _failed() and not trainer.stop_requested:
        trainer.stop_requested = True
        _stopped_at = trainer.step_idx


def _train(study, recipe: str, seed: int, threads: int, jobs: int) -> tuple[str, float]:
    """In a worker: train (or reuse, or resume) one run, one of ``jobs`` at a time; (how:
    `run_how`, final validation loss)."""
    global _stopped, _running, _stopped_at
    import torch

    from lowbit.report.compare import final_loss, run_how, run_one

    torch.set_num_threads(threads)
    _running, _stopped_at = True, None
    try:
        if _failed():  # another run failed before this one started
            raise Stopped(None)
        if _stopped:  # after `_running` is set: a stop that comes between is not missed
            raise KeyboardInterrupt
        record = run_one(study, recipe, seed, quiet=True, jobs=jobs, on_step=_stop_after_step)
    except KeyboardInterrupt:
        if _stopped_at is not None:  # stopped after another run failed, as asked, saved
            raise Stopped(_stopped_at) from None
        _stopped = True
        raise
    finally:
        _running = False
    return run_how(record), final_loss(record)


def _ask_to_stop(pool: ProcessPoolExecutor) -> None:
    """Ask every worker to stop its run as a first Ctrl-C does (finish the step, save a
    checkpoint): a SIGINT that reached this process alone (a scheduler, ``kill -INT``) would
    otherwise leave the workers training to the end. Idempotent, so after a Ctrl-C that reached
    the whole process group it does not escalate to an abort."""
    if STOP_SIGNAL is None:
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, STOP_SIGNAL)


def _system_killed(workers: dict) -> set[int]:
    """The pids of the pool's ``workers`` (pid: process, ended) that the system killed: those a
    signal ended, but for the SIGTERM with which the broken pool ends the others. A worker still
    setting up its run (before its trainer handles SIGTERM as a stop that saves) dies of that
    one, its run.json left running as a killed run's, and was named as killed too. Where only
    SIGTERMs ended workers (one sent from outside broke the pool), every one they ended."""
    ended = {pid: -p.exitcode for pid, p in workers.items() if (p.exitcode or 0) < 0}
    return {pid for pid, signum in ended.items() if signum != signal.SIGTERM} or set(ended)


def _killed(runs, pids: set[int]) -> list[tuple]:
    """The runs of ``runs`` whose worker died without a word: run.json says running, in one of
    ``pids`` (the workers the system killed, `_system_killed`: not a run killed in an earlier
    invocation, queued here), and no process holds the run's folder
    (`lowbit.train.runstate.state`). Empty where the worker died before its run wrote run.json,
    or the folder's lock cannot be told."""
    from lowbit.train.config import read_run_info
    from lowbit.train.runstate import state

    killed = []
    for study, recipe, seed in runs:
        folder = study.run_dir(recipe, seed)
        info = read_run_info(folder)
        if info.get("pid") in pids and state(folder, info) == "killed":
            killed.append((study, recipe, seed))
    return killed


def _listed(names: list[str]) -> str:
    """``names`` as a sentence lists them: "a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _in_words(count: int) -> str:
    """``count`` in words up to nine, the number past it: "two of 4 runs at a time"."""
    words = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return words[count - 1] if 0 < count <= len(words) else str(count)


def raise_interrupt(signum, frame) -> None:
    """A signal handler that stops as Ctrl-C does: Python's own for SIGINT, which a process
    started with SIGINT ignored (a shell script's background job) does not install. A SIGTERM
    raises `Terminated`, which the command's line names, and once the study is stopping is let
    pass (`raise_terminated`): SIGTERMs repeated as the workers saved raised again there, and a
    run was left without its checkpoint, "running"."""
    if signum == signal.SIGTERM:
        raise_terminated(signum, frame)
        return
    raise KeyboardInterrupt


def train_runs(runs, jobs: int, threads: int | None = None, log=print) -> set:
    """Train every ``(study, recipe, seed)`` of ``runs``, up to ``jobs`` at a time in worker
    processes of ``threads`` PyTorch threads (None: the cores shared out between them); returns
    the ``(study.out, recipe, seed)`` it trained (not reused). The first run that fails stops the
    queue and raises its error here.

    A finished run is reused here, not in a worker: each worker is a fresh interpreter that
    imports PyTorch, seconds before it reads a record, and the rerun of a finished study took
    that long for nothing. Only the runs left start workers, no more of them than there are
    runs left, and none when every run is finished. The runs left train under the load of the
    whole study (``jobs`` capped at its runs, the threads shared out between those), as the
    finished ones did: trained on more threads, a resumed run's speed was not comparable with
    theirs, and the report warned of mixed loads and thread counts."""
    from lowbit.report.compare import final_loss, reusable_record

    reset_stopping()  # an earlier study's stop, in a program that runs more than one
    runs, left, finished = list(runs), [], 0
    jobs = min(jobs, len(runs))  # fewer runs than --jobs: the cores are theirs to share
    threads = threads or default_threads(jobs)
    for study, recipe, seed in runs:
        record = reusable_record(study, recipe, seed)
        if record is None:
            left.append((study, recipe, seed))
            continue
        finished += 1
        log(
            f"[{finished}/{len(runs)}] {study.out.name}: {recipe} seed {seed}: validation loss "
            f"{final_loss(record):.4f} (reused)"
        )
    runs = left  # numbered after the runs reused (`finished`)
    trained: set[tuple[Path, str, int]] = set()
    if not runs:
        return trained
    context = multiprocessing.get_context("spawn")
    failure = context.Event()  # one run failed: the others stop after their step (`_failed`)
    with (
        warnings_once(),
        # a SIGTERM (how a scheduler ends a job) stops the study as a Ctrl-C does, the workers
        # saving a checkpoint; by default it ended this process alone and left the workers
        # training to the end, orphaned, where a rerun would train the same folders again. So
        # does a SIGINT where this process was started with it ignored (``... --jobs 2 &`` in a
        # shell script: Python keeps the SIG_IGN), where a `kill -INT` was lost
        signals_handled(raise_interrupt, signal.SIGINT, signal.SIGTERM),
        ProcessPoolExecutor(
            max_workers=min(jobs, len(runs)),
            mp_context=context,
            initializer=_start_worker,
            initargs=(failure, _warned),
        ) as pool,
    ):
        started = time.perf_counter()
        futures: dict = {}
        pending, reported = set(), set()

        def name(future) -> str:
            study, recipe, seed = futures[future]
            return f"{study.out.name}: {recipe} seed {seed}"

        def report(future) -> None:  # raises the run's error
            study, recipe, seed = futures[future]
            try:
                how, loss = future.result()
            except BrokenProcessPool:  # a traceback from the pool's internals otherwise
                # the pool ends the other workers (SIGTERM: they save a checkpoint); once they
                # have, the dead worker's folder is surely unlocked (its lock can outlive the
                # pipe that told the pool it died, by a moment)
                pool.shutdown()
                killed_pids = _system_killed(processes)
                dead = _killed(runs, killed_pids)
                killed = [name(f) for f in futures if futures[f] in dead]
                workers = min(jobs, len(runs))
                what = (
                    f"{_listed(killed)}, {_in_words(len(killed))} of {workers} runs at a time"
                    if killed
                    else f"{study.out.name}'s runs, {workers} at a time"
                )
                who = "a worker process" if len(killed) < 2 else "worker processes"
                # every worker killed: no other run was in progress to stop
                others = "the other runs stopped, " if len(killed_pids) < len(processes) else ""
                raise UsageError(
                    f"{who} died while training {what} (killed by the system: out of "
                    f"memory?); {others}every run keeps its last checkpoint and the finished "
                    "ones are reused; fix: a lower --jobs (each worker holds its own model and "
                    "data), then run the same command again to resume"
                ) from None
            if how != "reused":
                trained.add((study.out, recipe, seed))
            reported.add(future)  # one by one: runs finishing together get their own numbers
            minutes = (time.perf_counter() - started) / 60
            log(
                f"[{finished + len(reported)}/{finished + len(futures)}] {name(future)}: "
                f"validation loss {loss:.4f} ({how}; "
                f"{minutes:.1f} min since the start, {jobs} jobs)"
            )

        failed, processes = None, {}
        try:
            # submitted in the try: a stop while the workers start is passed on to them
            with _held_while_workers_start():  # `submit` starts the workers
                for run in runs:
                    future = pool.submit(_train, *run, threads, jobs)
                    futures[future] = run
                    pending.add(future)
            # started by now, for good; kept: the pool drops them as it shuts down (`_killed`)
            processes = dict(getattr(pool, "_processes", None) or {})
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for failed in done:
                    report(failed)
        except KeyboardInterrupt:
            # a SIGTERM repeated as the command exits is let pass: it ended it with status 143
            note_stopping()
            for future in pending:
                future.cancel()
            _ask_to_stop(pool)  # the runs in progress save a checkpoint and stop
            # the pool's shutdown (leaving the ``with``) waits for every worker to end: their
            # lines ("interrupted: ... saves a checkpoint after step S") come before the study's
            raise
        except BaseException as stopping:
            raised = str(stopping)
            # the runs not yet started never start; those in progress (or finished meanwhile)
            others = [f for f in futures if f not in reported and f is not failed]
            others = [f for f in others if not f.cancel()]
            failure.set()
            pool.shutdown()  # each run in progress saves its step and stops
            for future in others:
                error = future.exception()
                if error is None:
                    report(future)
                elif isinstance(error, Stopped) and error.step is not None:
                    log(
                        f"stopped: {name(failed)} failed; {name(future)} saved at step "
                        f"{error.step}, resumes with the same command"
                    )
                # the same error (bad data every run reads) is said once, as the study's error
                elif not isinstance(error, Stopped | KeyboardInterrupt | BrokenProcessPool) and (
                    str(error) != raised
                ):
                    log(f"{name(future)}: failed too: {error}")
            raise
    return trained
