"""Several processes that start together (the ranks of a distributed run, the workers of lowbit
compare --jobs) and meet another process's build lock: each printed "waiting for another
process's build of the kernels", then its own "waited N s"; one of them says so now (session 37)."""

import os
import select
import subprocess
import sys
import time

# "loading" once lowbit is imported, then the load, which waits for the lock
LOAD = "from lowbit import kernels; print('loading', flush=True); print(kernels.available())"
NOTE = "another process"


def _until_one_says_it(waiting, timeout: float = 120) -> dict:
    """Each process's stderr read until one of them has said it waits: process: what it wrote so
    far. (A fixed 4.5 s after their "loading" left a process 1.5 s to set up its wait, which
    the 3 s quiet wait then follows: with 2 s of set-up, none had said it yet.)"""
    said = {process: b"" for process in waiting}
    deadline = time.monotonic() + timeout
    while not any(NOTE.encode() in text for text in said.values()):
        assert time.monotonic() < deadline, f"no process said it waits in {timeout} s: {said}"
        assert all(process.poll() is None for process in waiting), said  # still waiting
        ready, _, _ = select.select([process.stderr for process in waiting], [], [], 1)
        for process in waiting:
            if process.stderr in ready:  # read from its pipe: `communicate` reads the rest there
                said[process] += os.read(process.stderr.fileno(), 65536)
    return said


def test_processes_waiting_together_say_it_once(build_copy):
    folder, env = build_copy
    lock = folder / "lock"
    lock.touch()  # another process's build in progress
    waiting = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    for process in waiting:
        assert process.stdout.readline() == b"loading\n"
    said = _until_one_says_it(waiting)
    # time for the others, which started with it, to wait past their quiet seconds too
    time.sleep(1.5)
    assert all(process.poll() is None for process in waiting)  # still waiting
    lock.unlink()  # that build is done
    done = [process.communicate(timeout=120) for process in waiting]
    assert [out.strip() for out, _ in done] == [b"True"] * 3
    errs = [(said[process] + err).decode() for process, (_, err) in zip(waiting, done)]
    notes = [line for err in errs for line in err.splitlines() if NOTE in line]
    assert len(notes) == 2, notes
    assert notes[0].startswith(
        f"lowbit: waiting for another process's build of the kernels (lock: {lock};"
    )
    assert notes[1].startswith("lowbit: waited ")
