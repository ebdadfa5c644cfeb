"""Session 30: the "waiting for another process's build" note is about the lock alone. It timed
the whole load: a lock released at once, then a slow load (this process's own compile, a loaded
machine), named after 3 s a lock no process held, and failed tests/kernels/test_build_lock_s29.py
on a busy CI machine."""

import subprocess
import sys

# Another process's load holds the lock for a second, then this one's load takes 4 s more.
BRIEF_LOCK_SLOW_LOAD = """
import pathlib, sys, time
from torch.utils import cpp_extension
from lowbit import kernels

lock = pathlib.Path(sys.argv[1])
load = cpp_extension.load


def other_process_loads_first(*args, **kwargs):
    time.sleep(1)
    lock.unlink()
    time.sleep(4)
    return load(*args, **kwargs)


cpp_extension.load = other_process_loads_first
print(kernels.available())
"""


def test_a_brief_lock_before_a_slow_load_says_nothing_of_waiting(build_copy):
    folder, env = build_copy
    lock = folder / "lock"
    lock.touch()
    done = subprocess.run(
        [sys.executable, "-c", BRIEF_LOCK_SLOW_LOAD, str(lock)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip() == "True", done.stderr
    assert "waiting for another process" not in done.stderr, done.stderr
