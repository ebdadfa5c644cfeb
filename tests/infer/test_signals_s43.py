"""A SIGTERM (how schedulers end a job) while `lowbit quantize --force` replaces an earlier folder."""

import os
import subprocess
import sys
from pathlib import Path

from lowbit.cli import main

LOWBIT = str(Path(sys.executable).parent / "lowbit")

# Imported at start-up by the subprocess's Python (PYTHONPATH): a SIGTERM to the process as the
# first file written into a hidden ``.partial-`` folder moves into the --out folder (the earlier
# folder's files set aside already), and the file MARK written to say it came there.
TERMINATE_MOVING_IN = """
import os, signal

plain = os.replace

def replace_then_terminate(src, dst, *args, **kwargs):
    if ".partial-" in os.fspath(src) and ".previous-" not in os.fspath(dst):
        os.replace = plain
        open("MARK", "w").close()
        os.kill(os.getpid(), signal.SIGTERM)
    return plain(src, dst, *args, **kwargs)

os.replace = replace_then_terminate
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_sigterm_as_force_replaces_a_folder_leaves_the_earlier_one(tmp_path, digits_run):
    """It killed the command halfway: the earlier folder's manifest set aside in a hidden folder,
    which the next command refused until the user moved it back by hand. Now the files are moved
    back, as on a Ctrl-C, and the command says so in one line."""
    out = tmp_path / "q"
    assert main(["quantize", str(digits_run), "--to", "int8", "--out", str(out)]) == 0
    earlier = _files(out)
    mark = tmp_path / "came"
    (tmp_path / "sitecustomize.py").write_text(TERMINATE_MOVING_IN.replace("MARK", str(mark)))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [LOWBIT, "quantize", str(digits_run), "--to", "fp8", "--out", str(out), "--force"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert mark.exists(), done.stderr  # the signal came as the new files moved in
    assert (done.returncode, done.stderr) == (130, "lowbit: terminated (SIGTERM)\n")
    assert _files(out) == earlier
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
