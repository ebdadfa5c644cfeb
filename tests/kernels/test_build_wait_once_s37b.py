"""Several processes that start together (the ranks of a distributed run, the workers of lowbit
compare --jobs) and meet another process's build lock: each printed "waiting for another
process's build of the kernels", then its own "waited N s"; one of them says so now (session 37)."""

import subprocess
import sys
import time

from lowbit import kernels

# "loading" once lowbit is imported, then the load, which waits for the lock
LOAD = "from lowbit import kernels; print('loading', flush=True); print(kernels.available())"


def test_processes_waiting_together_say_it_once(build_copy):
    folder, env = build_copy
    lock = folder / "lock"
    lock.touch()  # another process's build in progress
    waiting = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for process in waiting:
        assert process.stdout.readline() == "loading\n"
    time.sleep(kernels._QUIET_WAIT_SECONDS + 1.5)  # each has waited past its quiet seconds
    assert all(process.poll() is None for process in waiting)  # still waiting
    lock.unlink()  # that build is done
    done = [process.communicate(timeout=120) for process in waiting]
    assert [out.strip() for out, _ in done] == ["True"] * 3
    said = [line for _, err in done for line in err.splitlines() if "another process" in line]
    assert len(said) == 2, said
    assert said[0].startswith(
        f"lowbit: waiting for another process's build of the kernels (lock: {lock};"
    )
    assert said[1].startswith("lowbit: waited ")
