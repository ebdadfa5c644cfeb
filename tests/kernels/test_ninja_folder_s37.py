"""Session 37: the kernels are built by lowbit's own ninja, whatever PATH holds.

torch runs the first ``ninja`` on PATH. pip's ninja (1.13, in the virtual environment's bin) and a
system one (1.11) hash the command lines in ``.ninja_log`` differently, so each took the other's
objects for stale: processes with and without ``.venv/bin`` on PATH rebuilt every object for each
other, 67-138 s a build under the folder's lock; and with no ninja on PATH the kernels were not
built at all (the slower PyTorch path)."""

import os
import shutil
import stat
import subprocess
import sys

from lowbit import kernels


def _folder_with(tmp_path, name, script=None):
    """A folder holding an executable ``name``: ``script``, or a link to the real program."""
    folder = tmp_path / name
    folder.mkdir()
    target = folder / name
    if script is None:
        target.symlink_to(shutil.which(name))
    else:
        target.write_text(script)
        target.chmod(target.stat().st_mode | stat.S_IXUSR)
    return folder


def test_another_ninja_first_on_path_builds_in_the_same_folder(tmp_path, monkeypatch):
    tag = kernels._build_tag()
    fake = _folder_with(tmp_path, "ninja", "#!/bin/sh\necho 1.0\n")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ.get('PATH', '')}")
    assert kernels._build_tag() == tag


def test_a_path_without_ninja_loads_the_built_kernels(build_copy, tmp_path):
    """An unactivated virtual environment on a machine without a system ninja: PATH holds the
    compiler (and sh) only."""
    _, env = build_copy
    bare = [_folder_with(tmp_path, program) for program in ("c++", "sh")]
    env = {**env, "PATH": os.pathsep.join(map(str, bare))}
    done = subprocess.run(
        [sys.executable, "-c", "from lowbit import kernels; print(kernels.available())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip() == "True", done.stderr
    assert done.stderr == ""
