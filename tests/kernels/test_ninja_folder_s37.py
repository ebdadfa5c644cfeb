"""Session 37: each ninja builds the kernels in a folder of its own.

torch runs the first ``ninja`` on PATH. pip's ninja (1.13, in the virtual environment's bin) and a
system one (1.11) hash the command lines in ``.ninja_log`` differently, so each took the other's
objects for stale: processes with and without ``.venv/bin`` on PATH rebuilt every object for each
other, 67-138 s a build under the folder's lock."""

import os
import stat

from lowbit import kernels


def _fake_ninja(folder):
    folder.mkdir()
    ninja = folder / "ninja"
    ninja.write_text("#!/bin/sh\necho 1.0\n")
    ninja.chmod(ninja.stat().st_mode | stat.S_IXUSR)
    return folder


def test_another_ninja_first_on_path_builds_in_another_folder(tmp_path, monkeypatch):
    first, second = _fake_ninja(tmp_path / "a"), _fake_ninja(tmp_path / "b")
    path = os.environ.get("PATH", "")
    monkeypatch.setenv("PATH", f"{first}{os.pathsep}{path}")
    tag = kernels._build_tag()
    assert kernels._build_tag() == tag  # the same ninja: the same folder
    monkeypatch.setenv("PATH", f"{second}{os.pathsep}{path}")
    assert kernels._build_tag() != tag
