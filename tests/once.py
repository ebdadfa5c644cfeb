"""Test fixtures made once per pytest session, whichever xdist worker asks first."""

from __future__ import annotations

import fcntl
import os
import pickle


def once_per_session(tmp_path_factory, name: str, make):
    """``make()``'s result (pickled), made by one pytest process of the session and read by the rest.

    Under ``pytest -n 2`` the tests of a module may be split between the two workers, and each
    ran the module's fixture: a module whose tests share one ``--nproc`` launch paid for two. The
    workers' base folders (``gw0``, ...) lie in the session's, where the first worker to take the
    lock makes the result and the others wait for it (a ``make`` that raises writes nothing: each
    test then fails with its own error)."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent
    made = base / f"{name}.pkl"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # dropped as the file closes
        if not made.exists():
            made.write_bytes(pickle.dumps(make()))
        return pickle.loads(made.read_bytes())
