"""Test fixtures made once per pytest session, whichever xdist worker asks first."""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
from pathlib import Path


def shared_base(tmp_path_factory) -> Path:
    """The session's base temp folder, which every xdist worker sees (a worker's own, ``gw0``,
    ``gw1``, ..., lies in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


def once_per_session(tmp_path_factory, name: str, make):
    """``make()``'s result (pickled), made by one pytest process of the session and read by the rest.

    Under ``pytest -n 2`` the tests of a module may be split between the two workers, and each
    ran the module's fixture: a module whose tests share one ``--nproc`` launch paid for two. The
    first worker to take the lock in the session's base folder makes the result and the others
    wait for it (a ``make`` that raises writes nothing: each test then fails with its own error)."""
    base = shared_base(tmp_path_factory)
    made = base / f"{name}.pkl"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # dropped as the file closes
        if not made.exists():  # written whole or not at all: a worker killed mid-write
            part = made.with_suffix(".part")  # would leave a cut pickle every later reader met
            part.write_bytes(pickle.dumps(make()))
            os.replace(part, made)
        return pickle.loads(made.read_bytes())


def folder_once_per_session(tmp_path_factory, name: str, make):
    """``make(folder)``'s result, made as ``once_per_session`` makes it, into a new ``folder``
    (``once-NAME``) of the session's base folder: a run that every worker's tests read (a test
    that changes it changes a copy: ``shutil.copytree`` into its ``tmp_path``)."""

    def made():
        folder = shared_base(tmp_path_factory) / f"once-{name}"
        shutil.rmtree(folder, ignore_errors=True)  # what a make that raised left behind
        folder.mkdir()
        return make(folder)

    return once_per_session(tmp_path_factory, name, made)


def run_once_per_session(tmp_path_factory, name: str, argv: list[str]):
    """The folder of the run ``lowbit ARGV --quiet --out FOLDER`` trains, once per session as
    `folder_once_per_session` makes it (tests that change it change a copy)."""
    from lowbit.cli import main

    def make(folder):
        out = folder / "run"
        assert main([*argv, "--quiet", "--out", str(out)]) == 0
        return out

    return folder_once_per_session(tmp_path_factory, name, make)
