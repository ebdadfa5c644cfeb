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
to the workers as a stop request (`_ask_to_stop`), with the same result.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from lowbit.distributed.context import STOP_SIGNAL, signals_handled
from lowbit.errors import UsageError


def default_threads(jobs: int) -> int:
    """Threads per worker: the machine's cores shared out between ``jobs`` workers."""
    return max(1, (os.cpu_count() or 1) // jobs)


# In a worker: a stop was asked (by `_ask_to_stop`, or a Ctrl-C that interrupted a run), so the
# runs still queued to this worker do not start; and whether a run is in progress.
_stopped = False
_running = False


def _start_worker() -> None:
    """Set up a worker for its lifetime: a stop request (`_ask_to_stop`, a Ctrl-C of the process
    group) that reaches it between runs, idle and waiting for its next, marks the worker stopped.
    Handled only while a run was in progress, it killed an idle worker (SIGUSR1's default), or
    raised KeyboardInterrupt in the pool's idle loop, which printed a traceback under the one-line
    error of the run that stopped the study."""
    for signum in (signal.SIGINT, STOP_SIGNAL):
        if signum is not None:
            signal.signal(signum, _stop)


def _stop(signum, frame) -> None:
    """The parent's stop request, or a Ctrl-C, outside a training loop (a trainer handles either
    as Ctrl-C's first press, `lowbit.train.trainer._stop_on_sigint`): no run starts after it, and
    the run being set up stops."""
    global _stopped
    _stopped = True
    if _running:
        raise KeyboardInterrupt


def _train(study, recipe: str, seed: int, threads: int, jobs: int) -> tuple[bool, float]:
    """In a worker: train (or reuse) one run, one of ``jobs`` at a time; (reused, final
    validation loss)."""
    global _stopped, _running
    import torch

    from lowbit.report.compare import final_loss, run_one

    torch.set_num_threads(threads)
    _running = True
    try:
        if _stopped:  # after `_running` is set: a stop that comes between is not missed
            raise KeyboardInterrupt
        record = run_one(study, recipe, seed, quiet=True, jobs=jobs)
    except KeyboardInterrupt:
        _stopped = True
        raise
    finally:
        _running = False
    return record["reused"], final_loss(record)


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


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def train_runs(runs, jobs: int, threads: int, log=print) -> set:
    """Train every ``(study, recipe, seed)`` of ``runs``, ``jobs`` at a time in worker processes
    of ``threads`` PyTorch threads; returns the ``(study.out, recipe, seed)`` it trained (not
    reused). The first run that fails stops the queue and raises its error here."""
    runs = list(runs)
    trained: set[tuple[Path, str, int]] = set()
    context = multiprocessing.get_context("spawn")
    with (
        # a SIGTERM (how a scheduler ends a job) stops the study as a Ctrl-C does, the workers
        # saving a checkpoint; by default it ended this process alone and left the workers
        # training to the end, orphaned, where a rerun would train the same folders again
        signals_handled(_raise_interrupt, signal.SIGTERM),
        ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_start_worker
        ) as pool,
    ):
        started = time.perf_counter()
        futures = {pool.submit(_train, *run, threads, jobs): run for run in runs}
        pending, finished = set(futures), 0
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    study, recipe, seed = futures[future]
                    try:
                        reused, loss = future.result()  # raises the run's error
                    except BrokenProcessPool:  # a traceback from the pool's internals otherwise
                        raise UsageError(
                            f"a worker process died while training {study.out.name}'s runs, "
                            f"{jobs} at a time (killed by the system: out of memory?); the runs "
                            "keep their last checkpoints; fix: a lower --jobs (each worker holds "
                            "its own model and data), then run the same command again to resume"
                        ) from None
                    if not reused:
                        trained.add((study.out, recipe, seed))
                    how = "reused" if reused else "trained"
                    minutes = (time.perf_counter() - started) / 60
                    finished += 1  # one by one: runs finishing together get their own numbers
                    log(
                        f"[{finished}/{len(futures)}] {study.out.name}: {recipe} seed {seed}: "
                        f"validation loss {loss:.4f} ({how}; {minutes:.1f} min since the start, "
                        f"{jobs} jobs)"
                    )
        except BaseException:
            for future in pending:
                future.cancel()
            _ask_to_stop(pool)  # the runs in progress save a checkpoint and stop
            raise
    return trained
