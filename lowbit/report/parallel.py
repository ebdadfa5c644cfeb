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
checkpoint, and the next invocation resumes it.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path


def default_threads(jobs: int) -> int:
    """Threads per worker: the machine's cores shared out between ``jobs`` workers."""
    return max(1, (os.cpu_count() or 1) // jobs)


def _train(
    study, recipe: str, seed: int, overwrite: bool, threads: int, jobs: int
) -> tuple[bool, float]:
    """In a worker: train (or reuse) one run, one of ``jobs`` at a time; (reused, final
    validation loss)."""
    import torch

    from lowbit.report.compare import run_one

    torch.set_num_threads(threads)
    record = run_one(study, recipe, seed, quiet=True, overwrite=overwrite, jobs=jobs)
    return record["reused"], record["final_metrics"].get("loss", math.nan)


def train_runs(runs, jobs: int, threads: int, overwrite: bool = False, log=print) -> set:
    """Train every ``(study, recipe, seed)`` of ``runs``, ``jobs`` at a time in worker processes
    of ``threads`` PyTorch threads; returns the ``(study.out, recipe, seed)`` it trained (not
    reused). The first run that fails stops the queue and raises its error here."""
    runs = list(runs)
    trained: set[tuple[Path, str, int]] = set()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        started = time.perf_counter()
        futures = {pool.submit(_train, *run, overwrite, threads, jobs): run for run in runs}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    study, recipe, seed = futures[future]
                    reused, loss = future.result()  # raises the run's error
                    if not reused:
                        trained.add((study.out, recipe, seed))
                    how = "reused" if reused else "trained"
                    minutes = (time.perf_counter() - started) / 60
                    finished = len(futures) - len(pending)
                    log(
                        f"[{finished}/{len(futures)}] {study.out.name}: {recipe} seed {seed}: "
                        f"validation loss {loss:.4f} ({how}; {minutes:.1f} min since the start, "
                        f"{jobs} jobs)"
                    )
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return trained
