"""Starting a multi-process run: ``lowbit train --nproc N`` spawns N local ranks; under torchrun
(one or many nodes) each process started by torchrun is a rank.

The launcher picks a free port (or checks MASTER_PORT), starts the ranks, and waits. When a rank
fails it stops the others at once (none is left blocked in a collective) and raises the failing
rank's error: a `UsageError`, `NonFiniteLoss` or `RunNotWritten` (a full disk) as such, anything
else as `RankFailed`.
Rank 0's `RunResult` comes back to the caller.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from lowbit.distributed.context import (
    STOP_SIGNAL,
    RankFailed,
    check_port,
    collective_timeout,
    free_port,
    join,
    progress_bars_lock_threads_only,
    requested_port,
    restore_env,
    signals_handled,
    torchrun_env,
)
from lowbit.errors import (
    RunNotWritten,
    UsageError,
    note_stopping,
    say_held_notes,
    warn,
    warnings_held,
)


def _error_classes():
    from lowbit.train.trainer import NonFiniteLoss

    return {
        "UsageError": UsageError,
        "NonFiniteLoss": NonFiniteLoss,
        "RunNotWritten": RunNotWritten,
    }


_FSDP_VIEW_OUTPUT = r"FSDP2-wrapped module \(.*\) returned a view tensor"
# In the ranks' folder once the launcher stops them for good (`_stop_unless_aborted`)
ABORTED = "aborted"
# The ranks' folder, in the environment the spawned ranks inherit: the one way to tell the
# launcher why a rank failed before it got its arguments (`_refuse_unguarded_main`)
_RANKS_FOLDER = "LOWBIT_RANKS_FOLDER"


def run_rank(config, resume=False, overwrite=False, quiet=False, on_step=None):
    """Train as one rank of the process group in the environment (torchrun's, or a one-process
    group when there is none); rank 0 returns the `RunResult`, the others None."""
    from lowbit.train.trainer import Trainer, resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1")) if torchrun_env() else 1
    config = replace(config, nproc=world, strategy=config.strategy or "ddp")
    threads = torch.get_num_threads()
    ranks = join(config.strategy, resolve_device(config.device))
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) == 1:
        # `join` shares the CPU cores out between a machine's ranks (without OMP_NUM_THREADS);
        # a machine's only rank shares them with no one, and keeps its process's threads: given
        # all the cores, a one-process --strategy run overrode a library user's set_num_threads
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            # FSDP2 warns, once in every rank, that a model returned a view (a token classifier's
            # logits: a Linear with a bias over 3-d input) which an in-place op would detach from
            # its pre-backward hook; the tasks' losses and metrics only read the outputs
            warnings.filterwarnings("ignore", _FSDP_VIEW_OUTPUT, UserWarning)
            with warnings_held():  # FSDP's state-block refusal (`check_state_blocks`) alone
                trainer = Trainer(config, quiet=quiet, dist=ranks, resume=resume)
            result = trainer.fit(resume, overwrite, on_step)
    finally:
        ranks.close()
    return result if ranks.is_main else None


def _worker(local_rank, nproc, port, config, resume, overwrite, quiet, on_step, folder):
    os.environ.update(
        RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    progress_bars_lock_threads_only()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if STOP_SIGNAL is not None:  # before training starts, the launcher's stop is a Ctrl-C
        signal.signal(STOP_SIGNAL, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _stop_unless_aborted(Path(folder)))
    try:
        from lowbit.train.trainer import preflight, resolve_device

        if resolve_device(config.device).type == "cuda":  # the launcher left this rank's GPU
            preflight(config, resume)
        result = run_rank(config, resume, overwrite, quiet, on_step)
        if result is not None:
            (Path(folder) / "result.pkl").write_bytes(pickle.dumps(result))
    except BaseException as error:
        _record(Path(folder), local_rank, error, f"error-{local_rank}.pkl")
        raise


def _record(folder: Path, rank: int | None, error: BaseException, name: str) -> None:
    """Write the record of a rank's ``error`` that `_failure` reads."""
    record = {
        "rank": rank,
        "time": time.time(),
        "kind": type(error).__name__,
        "message": str(error),
        # as text: what `_failure` rebuilds the error from (`RunNotWritten`'s parts)
        "args": tuple(None if arg is None else str(arg) for arg in error.args),
        "traceback": "".join(traceback.format_exception(error)),
    }
    # whole or not at all (renamed into place): the launcher reads the records as soon as a
    # rank fails, and torch stops the other ranks then, which tore a record being written
    # (the launcher's "EOFError: Ran out of input" traceback)
    partial = folder / f".{name}.tmp"
    partial.write_bytes(pickle.dumps(record))
    os.replace(partial, folder / name)


def _refuse_unguarded_main(config) -> None:
    """Refuse a call made by a spawned rank as it imports the calling script again (Python's
    spawn runs the main module in each new process), which is a call not under ``if __name__ ==
    "__main__":``. Python refused the rank's own spawn instead: each rank printed a screenful
    of "An attempt has been made to start a new process before the current process has finished
    its bootstrapping phase", and the caller got `RankFailed: rank 0 died (exit 1)`, naming
    neither the guard nor lowbit's call. Here the rank hands the launcher the `UsageError` to
    raise (`_failure`), and exits without a traceback of its own."""
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return  # set by multiprocessing while a spawned process imports the main module
    error = UsageError(
        f"train(TrainConfig(nproc={config.nproc})) ran again in every rank as it imported "
        f"the calling script {sys.argv[0] or '(main module)'}: the call is not under "
        f'`if __name__ == "__main__":`; fix: put the call under that guard'
    )
    folder = os.environ.get(_RANKS_FOLDER)
    if folder is None:  # not one of lowbit's ranks: the error is all there is to say
        raise error
    _record(Path(folder), None, error, f"error-pid{os.getpid()}.pkl")
    raise SystemExit(1)


def _check_sendable(on_step, nproc: int) -> None:
    """Refuse an ``on_step`` that the spawned ranks, which each call it in a process of their own,
    cannot be sent: spawn pickles it, and a lambda or nested function pickled only as a
    `PicklingError` traceback from inside multiprocessing, after the pre-flight."""
    from multiprocessing.reduction import ForkingPickler

    try:
        ForkingPickler.dumps(on_step)
    except Exception as error:  # pickle raises PicklingError, AttributeError or TypeError
        raise UsageError(
            f"on_step {on_step!r} cannot be sent to the {nproc} spawned ranks, each of which "
            f"calls it in its own process ({type(error).__name__}: {error}); fix: a function "
            "defined at the top level of a module"
        ) from None


def _stop_unless_aborted(folder: Path):
    """A rank's SIGTERM handler. A SIGTERM to the whole process group (Slurm's preemption,
    ``timeout``, systemd, ``kill -TERM -- -PGID``) reaches every rank with the launcher's: it is
    the launcher's stop request (`STOP_SIGNAL`: save at the next step boundary, which the ranks
    agree on). With SIGTERM's default action the ranks died where they were and the steps since
    the last checkpoint were lost. The launcher's own SIGTERM, once it has given up on the run (a
    failed rank: torch's ``join``; a second Ctrl-C), comes after its `ABORTED` mark in ``folder``
    and ends the rank as the default action did (once its main thread runs Python again; one
    stuck in a collective is killed after a grace period)."""

    def handler(signum, frame):
        if (folder / ABORTED).exists():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif not asked:  # once: a repeated SIGTERM must not abort the save it asked for
            asked.append(signum)
            signal.getsignal(STOP_SIGNAL)(signum, frame)

    asked: list[int] = []
    return handler


def _failure(folder: Path, exited_rank: int | None, detail: str, out, replaced) -> BaseException:
    """The exception to raise for a failed run: the first rank's own error (a `RankFailed` says
    what the run in ``out`` kept, `kept_text`, ``replaced`` as there)."""
    from lowbit.train.runstate import kept_text

    records = [pickle.loads(p.read_bytes()) for p in folder.glob("error-*.pkl")]
    if not records:
        rank = "a rank" if exited_rank is None else f"rank {exited_rank}"
        return RankFailed(
            f"{rank} died ({detail}); the other ranks were stopped; {kept_text(out, replaced)}"
        )
    first = min(records, key=lambda r: r["time"])
    kind = _error_classes().get(first["kind"])
    if kind is not None:
        return kind(*first.get("args") or (first["message"],))
    if first["kind"] == "KeyboardInterrupt":
        return KeyboardInterrupt()
    last = first["traceback"].strip().splitlines()[-1]
    return RankFailed(
        f"rank {first['rank']} failed: {last}; the other ranks were stopped; {kept_text(out, replaced)}"
    )


@contextlib.contextmanager
def _quiet_stops():
    """Within: torch's "Terminating process N via signal SIGTERM" warning is dropped. After one
    rank failed the launcher stops the others by design and raises the failed rank's error
    itself, so a usage error prints one line, as in one process (the warning, one per rank still
    running, read as more failures). Its SIGKILL warning, a rank that did not stop, stays."""
    log = logging.getLogger("torch.multiprocessing.spawn")  # the logger of torch's ProcessContext

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Terminating process")

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def spawn(config, resume=False, overwrite=False, quiet=False, on_step=None):
    """Run ``config.nproc`` local ranks and wait for them; rank 0's `RunResult`."""
    import torch.multiprocessing as mp

    port = requested_port()
    if port is None:
        port = free_port()
    else:
        check_port(port)
    from lowbit.train.runstate import checkpoints_present

    replaced = checkpoints_present(config.out) if overwrite else None  # `kept_text`
    with tempfile.TemporaryDirectory(prefix="lowbit-ranks-") as tmp:
        folder = Path(tmp)
        args = (config.nproc, port, config, resume, overwrite, quiet, on_step, str(folder))
        with _environment(**{_RANKS_FOLDER: str(folder)}):
            context = mp.start_processes(
                _worker, args=args, nprocs=config.nproc, join=False, start_method="spawn"
            )
        asked = aborted = False  # the ranks were asked to stop; were stopped for good
        received: list[int] = []  # the signals that stopped this process, in order
        handled = 0  # how many of them were handled
        # Whether the loop is not waiting (handling a signal, or on its way to): a signal that
        # comes then waits its turn in `received`. Raised there, a second one escaped the loop
        # while the ranks were being asked to stop or terminated, and left them running. True at
        # the top of the loop, which is outside its ``try``.
        handling = True

        def stop(signum, frame):
            nonlocal handling
            received.append(signum)
            if not handling:  # wake the loop's wait: it handles `received` in order
                handling = True
                raise KeyboardInterrupt

        # A SIGINT raises KeyboardInterrupt here even where this process was started with
        # SIGINT ignored (`lowbit train --nproc 2 ... &` in a shell script: Python then keeps the
        # inherited SIG_IGN, and a later `kill -INT` was swallowed while the ranks trained on to
        # the end, where a one-process run, which installs its own handler, stops).
        # A SIGTERM (how schedulers and `kill` end a job) is the same request, as it is to a
        # one-process run: by default it ended this process alone, and the ranks, sent SIGINT by
        # torch as their parent died, lost the step's collectives and saved nothing.
        with signals_handled(stop, signal.SIGINT, signal.SIGTERM), _quiet_stops():
            killed: dict[int, str] = {}
            while True:
                try:
                    while handled < len(received) and not aborted:
                        handled += 1
                        signum = received[handled - 1]
                        if not asked:
                            asked = True
                            note_stopping()  # a SIGTERM after the ranks end: let pass
                            # A Ctrl-C reaches the ranks too; a SIGINT sent to this process
                            # alone (kill -INT, a scheduler) does not: ask every rank to save and
                            # stop, which is the same request, not a second Ctrl-C, for a rank
                            # that got the first.
                            _ask_to_stop(context, signum)
                        elif signum == signal.SIGINT:  # a second Ctrl-C aborts
                            _terminate(context, folder)
                            aborted = True
                        # a repeated SIGTERM (the group's and a `kill` of this process) lets the
                        # ranks finish their save, as in one process
                    if aborted:
                        break
                    handling = False  # from here on a signal wakes the wait
                    if handled < len(received):  # one that came before: its turn first
                        handling = True
                        continue
                    killed = killed or _wait_for_an_exit(context)
                    if any(p.exitcode not in (None, 0) for p in context.processes):
                        # a rank failed: `join` stops the others with SIGTERM, which is no
                        # request to save any more
                        (folder / ABORTED).touch()
                    if context.join():
                        handling = True  # a signal now is not raised out of a completed run
                        break
                    handling = True
                except KeyboardInterrupt:
                    continue  # a signal (`stop`): handled at the top of the loop
                except mp.ProcessRaisedException as error:
                    if killed:  # the others' errors ("Connection reset by peer") followed
                        raise _killed(killed, config.out, replaced) from None
                    raise _failure(
                        folder, error.error_index, "an exception", config.out, replaced
                    ) from None
                except mp.ProcessExitedException as error:
                    if asked:  # a rank stopped by the Ctrl-C before its handler was set
                        raise KeyboardInterrupt from None
                    if killed:  # before the error a rank it broke may have recorded
                        raise _killed(killed, config.out, replaced) from None
                    detail = (
                        f"signal {error.signal_name}"
                        if error.signal_name
                        else f"exit {error.exit_code}"
                    )
                    raise _failure(
                        folder, error.error_index, detail, config.out, replaced
                    ) from None
            if aborted:
                raise KeyboardInterrupt
        result = folder / "result.pkl"
        if not result.exists():  # torch's worker wrapper exits 0 on a KeyboardInterrupt (a
            # Ctrl-C in the ranks' set-up, before they save on one): the ranks' own errors
            raise _failure(folder, None, "it returned no result", config.out, replaced)
        return pickle.loads(result.read_bytes())


@contextlib.contextmanager
def _environment(**variables: str):
    """Within: ``variables`` set in this process's environment, which a spawned process
    inherits; after, as they were."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        restore_env(before)


def _wait_for_an_exit(context) -> dict[int, str]:
    """Wait until a rank ends; the ranks killed by a signal by then (rank: signal name), read
    before torch's ``join`` stops the others. A killed rank (SIGKILL: the OOM killer) breaks the
    others' next collective, and torch reported whichever failure it met first: often a rank's
    gloo "Connection reset by peer", naming the wrong rank and not the kill.

    A rank whose sentinel fired is reaped (``join``) before its exit code is read: the kernel
    closes a killed process's files before it can be waited for, so its ``exitcode`` could still
    read None. The launcher then missed the failure, did not mark the run `ABORTED` before torch's
    ``join`` sent the other ranks SIGTERM, and they took it for a stop request: rank 0 reported the
    gloo error of its save's collectives, not the kill."""
    from multiprocessing.connection import wait

    running = {
        process.sentinel: process for process in context.processes if process.exitcode is None
    }
    for sentinel in wait(list(running)) if running else ():
        running[sentinel].join(timeout=1)
    return {
        rank: _signal_name(-process.exitcode)
        for rank, process in enumerate(context.processes)
        if process.exitcode is not None and process.exitcode < 0
    }


def _killed(killed: dict[int, str], out, replaced) -> RankFailed:
    from lowbit.train.runstate import kept_text

    rank, name = min(killed.items())
    return RankFailed(
        f"rank {rank} died (signal {name}); the other ranks were stopped; {kept_text(out, replaced)}"
    )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal has no name
        return str(signum)


def _ask_to_stop(context, signum: int) -> None:
    """Ask the ranks to save and stop, after this process got ``signum``: a SIGTERM goes on as
    itself, which each rank's `_stop_unless_aborted` takes as the request, so that rank 0 says
    the run was terminated; a SIGINT as `STOP_SIGNAL` (another SIGINT would abort a rank that
    had the terminal's Ctrl-C). All as `STOP_SIGNAL`, a group's SIGTERM was reported as a
    Ctrl-C ("interrupted ... Ctrl-C again to abort"): a rank handles its pending signals in
    number order, SIGUSR1 before SIGTERM."""
    if STOP_SIGNAL is None:
        return
    request = signal.SIGTERM if signum == signal.SIGTERM else STOP_SIGNAL
    for process in context.processes:
        if process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, request)


def _terminate(context, folder: Path) -> None:
    (folder / ABORTED).touch()  # before the SIGTERM: the ranks take it as an end, not a request
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    for process in context.processes:
        process.join(10)
        if process.is_alive():  # its SIGTERM handler waits for Python code: stuck in a collective
            process.kill()


def train(config, resume=False, overwrite=False, quiet=False, on_step=None):
    """`lowbit.train.train` for a config with a ``strategy``: in this process under torchrun or
    with one process, else spawned. `preflight` comes first: refused in a rank, a run that cannot
    start was refused by every rank, after their set-up."""
    from lowbit.train.trainer import preflight

    if torchrun_env():
        preflight(config, resume, _torchrun_process_counts())
        return run_rank(config, resume, overwrite, quiet, on_step)
    if config.nproc == 1:  # a rank's Trainer leaves the pre-flight to its launcher: this one
        preflight(config, resume)
        return run_rank(config, resume, overwrite, quiet, on_step)
    _refuse_unguarded_main(config)
    _check_sendable(on_step, config.nproc)
    if sys.platform == "win32":
        raise UsageError("--nproc needs Linux or macOS; fix: use torchrun")
    gpus = torch.cuda.device_count() if config.device != "cpu" else 0
    if gpus and config.nproc > gpus:
        raise UsageError(
            f"--nproc {config.nproc} but {torch.cuda.device_count()} GPUs; fix: lower --nproc"
        )
    preflight(config, resume, gpu_memory=False)  # each rank checks its own GPU (`_worker`)
    _check_inputs(config, resume)
    cores = os.cpu_count() or 1
    if not gpus and config.nproc > cores:
        # it runs (one thread a rank), but the ranks take turns on the cores: a user who took
        # --nproc for a count of workers to speed the run up got a slower run, silently
        warn(
            f"--nproc {config.nproc} CPU processes on {cores} cores: the ranks share cores and "
            f"train slower than fewer would; fix: --nproc {cores} or fewer"
        )
    say_held_notes()  # past the launcher's refusals (a rank's own come after its start-up)
    return spawn(config, resume, overwrite, quiet, on_step)


def _check_inputs(config, resume: bool) -> None:
    """Refuse here, before the ranks start, the input that a one-process run refuses as its
    `Trainer` sets up and that each rank refused only then, after two interpreters had imported
    torch (15-20 s) and joined a process group: ``LOWBIT_DIST_TIMEOUT``, which the ranks
    inherit, the run's inputs (`lowbit.train.tasks.check_inputs`), and a checkpoint whose kind,
    bytes, settings or --steps the resume refuses (`check_resumable`). The ranks check again
    (under torchrun no launcher runs), and make the checks that need the run's tokenizer or
    built model."""
    from lowbit.train.tasks import check_inputs
    from lowbit.train.trainer import check_resumable

    collective_timeout()
    check_inputs(config, resume)
    if resume:
        check_resumable(config, distributed=True)


def process_count_flag() -> str:
    """How a fix names other process counts in a rank: torchrun's flags in a process torchrun
    started (it sets TORCHELASTIC_RUN_ID; lowbit's own --nproc launcher does not), else
    ``--nproc``."""
    return _torchrun_process_counts() if "TORCHELASTIC_RUN_ID" in os.environ else "--nproc {}"


def _torchrun_process_counts() -> str:
    """How a fix names other process counts under torchrun: its own flags, not lowbit's --nproc."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == int(os.environ["WORLD_SIZE"]):
        return "torchrun --nproc-per-node {}"
    return "a world size (torchrun's --nnodes x --nproc-per-node) of {}"
