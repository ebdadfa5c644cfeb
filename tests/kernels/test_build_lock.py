"""The kernels' build lock: one left by a killed build no longer hangs every later run."""

import os
import re
import subprocess
import sys
import time

LOAD = "from lowbit import kernels; print(kernels.available())"


def test_a_lock_an_interrupted_build_left_is_removed(build_copy):
    """torch's loader waits, with no time limit, for the lock file a build holds: one that a
    SIGTERM or SIGKILL during the first build left behind hung every later run, silently."""
    folder, env = build_copy
    lock = folder / "lock"
    lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    done = subprocess.run(
        [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "True", done.stderr
    assert f"lowbit: removed {lock}, a build lock 60 minutes old" in done.stderr
    assert not lock.exists()


def test_a_build_in_progress_is_waited_for_and_said(build_copy):
    """A recent lock is another process's build (the ranks of a distributed run start together):
    waited for, with a note naming the lock, then loaded when that build is done. The waiting
    process then says it waited, where it said "compiled the fused quantization kernels in 32 s"
    as the one that compiles does (session 25)."""
    folder, env = build_copy
    lock = folder / "lock"
    lock.touch()
    waiting = subprocess.Popen(
        [sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    note = waiting.stderr.readline()  # said once the wait has lasted a few seconds
    assert waiting.poll() is None  # still waiting for the other build
    # the note comes once the wait has lasted 3 s (`_QUIET_WAIT_SECONDS`), so the load already
    # takes longer than a cache hit (over 3 s), as a build does; a moment more for margin
    time.sleep(0.5)
    lock.unlink()  # that build is done
    out, err = waiting.communicate(timeout=120)
    assert out.decode().strip() == "True"
    assert f"waiting for another process's build of the kernels (lock: {lock};" in note.decode()
    assert re.fullmatch(
        r"lowbit: waited \d+ s for another process's build of the fused quantization kernels\n",
        err.decode(),
    )


def test_a_lock_that_goes_stale_while_waited_for_is_removed(build_copy):
    """A lock left by a process killed while it held it (every load takes it, so a run stopped
    at start-up leaves one) was stale only to a later run: a run started just after the kill
    waited for it for good. The waiting run removes it once it is stale and loads."""
    folder, env = build_copy
    lock = folder / "lock"
    lock.touch()
    # made 4 s short of stale once lowbit is imported (the import's time varies with the load)
    load = (
        "import os, sys, time; from lowbit import kernels; "
        "t = time.time() - kernels._STALE_LOCK_SECONDS + 4; os.utime(sys.argv[1], (t, t)); "
        "print(kernels.available())"
    )
    done = subprocess.run(
        [sys.executable, "-c", load, str(lock)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "True", done.stderr
    assert f"lowbit: removed {lock}, a build lock 10 minutes old" in done.stderr
    assert not lock.exists()
