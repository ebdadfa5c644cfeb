"""A SIGTERM (how Slurm, Kubernetes, systemd and `timeout` end a job) at every moment of a command:
as it starts, and repeated after a run's steps took the first."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOWBIT = str(Path(sys.executable).parent / "lowbit")
TERMINATED = "lowbit: terminated (SIGTERM)\n"

# Imported at start-up by every Python of the subprocess (PYTHONPATH): the first import of the
# module MODULE sends the process a SIGTERM, as a scheduler's would land then. torch is imported
# by lowbit's own import, lowbit.commands.formats as `lowbit.cli.main` builds the command line.
TERMINATE_IMPORT = """
import os, signal, sys

class TerminateImport:
    def find_spec(self, name, path=None, target=None):
        if name == "MODULE":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, TerminateImport())
"""


@pytest.mark.parametrize("module", ["torch", "lowbit.commands.formats"])
def test_a_sigterm_while_the_command_starts_is_one_line(tmp_path, module):
    """It killed the command without a word (status -15 to Python, 143 to a shell)."""
    (tmp_path / "sitecustomize.py").write_text(TERMINATE_IMPORT.replace("MODULE", module))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [LOWBIT, "recipes"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert (done.returncode, done.stderr, done.stdout) == (130, TERMINATED, "")


# The same as lowbit.commands.formats is imported, and a second SIGTERM as the command writes its
# line about the first (a scheduler's to the process group and a `kill` of the process).
TERMINATE_TWICE = """
import os, signal, sys

class TerminateImport:
    def find_spec(self, name, path=None, target=None):
        if name == "lowbit.commands.formats":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

class TerminateAsItSays:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if text.startswith("lowbit: terminated"):
            os.kill(os.getpid(), signal.SIGTERM)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.meta_path.insert(0, TerminateImport())
sys.stderr = TerminateAsItSays(sys.stderr)
"""


def test_a_second_sigterm_as_the_command_reports_the_first_is_let_pass(tmp_path):
    """It was raised in the command's report of the first: a traceback, exit 1."""
    (tmp_path / "sitecustomize.py").write_text(TERMINATE_TWICE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [LOWBIT, "recipes"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert (done.returncode, done.stderr, done.stdout) == (130, TERMINATED, "")


# The same, as the command first opens the file DATA (reading the user's --data).
TERMINATE_READ = """
import builtins, io, os, signal

def open_then_terminate(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and os.fspath(file) == "DATA":
        builtins.open = io.open = plain
        os.kill(os.getpid(), signal.SIGTERM)
    return plain(file, *args, **kwargs)

plain = io.open
builtins.open = io.open = open_then_terminate
"""


def test_a_sigterm_as_a_run_reads_its_data_names_it_and_writes_nothing(tmp_path):
    """`lowbit train` said nothing and died (-15) as it read its data; a Ctrl-C there says
    "lowbit: aborted; ...": the SIGTERM is named in its place."""
    data = tmp_path / "data.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200, encoding="utf-8")
    (tmp_path / "sitecustomize.py").write_text(TERMINATE_READ.replace("DATA", str(data)))
    run = tmp_path / "run"
    command = [LOWBIT, "train", "--data", str(data), "--model", "nano", "--seq-len", "16"]
    command += ["--batch-size", "4", "--steps", "2", "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    said = "lowbit: terminated (SIGTERM); no checkpoint was written, nothing to resume\n"
    assert (done.returncode, done.stderr[-len(said) :]) == (130, said), done.stderr
    assert "Traceback" not in done.stderr
    assert not run.exists()


def test_a_program_that_imports_lowbit_keeps_its_own_sigterm(tmp_path):
    """Only the command answers a SIGTERM as a Ctrl-C: a program that imports lowbit dies of it as
    any program does (its own handler, or none)."""
    (tmp_path / "sitecustomize.py").write_text(TERMINATE_IMPORT.replace("MODULE", "torch"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", "import lowbit\nprint('went on')"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert (done.returncode, done.stdout) == (-signal.SIGTERM, "")


# Imported at start-up by every Python of the subprocess (PYTHONPATH): a Ctrl-C (SIGINT to the
# process) as the C++ function FUNCTION of torch's start-up calls Python (an import), and the file
# MARK written to say it came there. torch.distributed's ``_c10d_init`` and torch.multiprocessing's
# ``_multiprocessing_init`` cannot hand a KeyboardInterrupt back: C++ aborted the process.
INTERRUPT_IN_TORCH_CPP = """
import os, signal, sys

calls = []  # the C functions running, innermost last (None: a Python function)

def watch(frame, event, arg):
    if event == "c_call":
        calls.append(getattr(arg, "__name__", None))
    elif event in ("c_return", "c_exception", "return"):
        if calls:
            calls.pop()
    elif event == "call":
        if calls and calls[-1] == "FUNCTION":
            sys.setprofile(None)
            open("MARK", "w").close()
            os.kill(os.getpid(), signal.SIGINT)
            return
        calls.append(None)

sys.setprofile(watch)
"""


@pytest.mark.parametrize("function", ["_c10d_init", "_multiprocessing_init"])
def test_a_ctrl_c_inside_torchs_cpp_start_up_is_one_line(tmp_path, function):
    """It aborted the process: "terminate called after throwing an instance of
    'pybind11::error_already_set' ... KeyboardInterrupt", status 134 (-6 to Python), no line."""
    mark = tmp_path / "came"
    site = INTERRUPT_IN_TORCH_CPP.replace("FUNCTION", function).replace("MARK", str(mark))
    (tmp_path / "sitecustomize.py").write_text(site)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [LOWBIT, "recipes"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert mark.exists(), f"torch's {function} called no Python: this test no longer reaches it"
    assert (done.returncode, done.stderr, done.stdout) == (130, "lowbit: interrupted\n", "")


class _Lines:
    """The lines a process writes to one of its pipes, read as they come (a thread)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("")  # the end of the stream
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float = 300) -> bool:
        """Whether a line holding ``text`` came before the stream ended."""

        def came() -> bool:
            return any(text in line for line in self.lines)

        with self.changed:
            self.changed.wait_for(lambda: came() or "" in self.lines, timeout)
            return came()

    def text(self) -> str:
        self.thread.join(timeout=300)
        return "".join(self.lines)


def test_sigterms_repeated_after_the_first_let_the_run_save_and_sum_up(tmp_path):
    """Slurm's SIGTERM to the job's processes and a ``kill`` of the process, 0.3 s apart: the
    second came as the run, its steps done, summed up, and killed it there (no summary, no resume
    line, exit -15, run.json left "running"). Here SIGTERM follows SIGTERM until the process ends:
    through the step, the save, the run's record of its end, its summary and Python's exit."""
    run = tmp_path / "run"
    command = [LOWBIT, "train", "--task", "image-classification", "--batch-size", "8"]
    command += ["--steps", "400", "--eval-interval", "1", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    out, err = _Lines(process.stdout), _Lines(process.stderr)
    try:
        assert out.wait_for("step 1: validation loss"), err.text()  # the steps handle SIGTERM
        process.send_signal(signal.SIGTERM)
        assert err.wait_for("terminated (SIGTERM)"), err.text()
        while process.poll() is None:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            process.kill()
    stdout, stderr = out.text(), err.text()
    assert process.returncode == 130, stderr
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    step = info["step"]
    assert info["status"] == "interrupted"
    assert f"{step} step{'s' if step > 1 else ''} (interrupted)" in stdout
    assert stdout.endswith(f"resume with: lowbit train --resume {run}\n")
    assert (run / "checkpoints" / f"step-{step:07d}.pt").is_file()
    assert "Traceback" not in stderr
