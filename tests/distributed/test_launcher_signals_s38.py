"""Session 38: a signal that reaches the ``--nproc`` launcher while it handles the one before
(asking its ranks to stop, or terminating them) waits its turn. Raised there, it escaped the
launcher's loop: a repeated SIGTERM (the group's and a `kill` of the launcher) ended the run with
KeyboardInterrupt instead of its saved result, and a second Ctrl-C left the ranks running instead
of aborting them."""

import multiprocessing
import os
import signal
import threading
import time

import pytest

import lowbit.distributed.launch as launch
from lowbit.train import TrainConfig, train

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals"),
    pytest.mark.slow,  # two spawned ranks import torch: seconds each on a busy machine
]

STEPS = 10_000  # far more than a run reaches before its signal: it stops on the signal
TIMEOUT = 240  # generous: the machine's cores are shared


def _signal_after_first_checkpoint(out, signum: int, stop: threading.Event) -> threading.Thread:
    """A thread that sends this process ``signum`` (to it alone, as `kill` does) once the run's
    first checkpoint exists: every rank is in its training loop."""

    def send():
        first = out / "checkpoints" / "step-0000001.dcp"
        deadline = time.monotonic() + TIMEOUT
        while not first.exists() and not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if first.exists():
            os.kill(os.getpid(), signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT)],
    ids=["SIGTERM-twice", "SIGINT-twice"],
)
def test_a_signal_while_the_launcher_handles_the_last_waits_its_turn(
    tmp_path, monkeypatch, first, second
):
    out = tmp_path / "run"
    ask = launch._ask_to_stop

    def and_another_comes(context, signum):  # the next signal, as the ranks are being asked
        ask(context, signum)
        os.kill(os.getpid(), second)

    monkeypatch.setattr(launch, "_ask_to_stop", and_another_comes)
    monkeypatch.setenv("LOWBIT_DIST_TIMEOUT", "60")
    # the digits CNN: the launcher's signals are those of every task, and its ranks start without
    # importing transformers (seconds of CPU each)
    config = TrainConfig(
        task="image-classification", batch_size=8, eval_interval=STEPS, steps=STEPS,
        save_interval=1, nproc=2, device="cpu", out=str(out),
    )  # fmt: skip
    stop = threading.Event()
    _signal_after_first_checkpoint(out, first, stop)
    try:
        if second == signal.SIGTERM:  # a repeated stop request: the ranks finish their save
            try:
                result = train(config, quiet=True)
            except KeyboardInterrupt:
                pytest.fail("the second SIGTERM escaped the launcher as KeyboardInterrupt")
            assert result.status == "interrupted" and 1 <= result.steps < STEPS
        else:  # a second Ctrl-C aborts: the ranks are ended before the launcher returns
            with pytest.raises(KeyboardInterrupt):
                train(config, quiet=True)
            assert not multiprocessing.active_children()
    finally:
        stop.set()
        for process in multiprocessing.active_children():  # whatever a failed test left
            process.kill()
            process.join()
