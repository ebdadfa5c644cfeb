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


def test_a_ctrl_c_and_a_sigterm_together_while_torch_loads_are_one_line(tmp_path):
    """Held until torch had loaded, both were let through at once: the SIGTERM raised as the
    command reported the Ctrl-C, a traceback and exit 1. The second ends the command."""
    site = TERMINATE_IMPORT.replace("MODULE", "torch")
    site = site.replace(
        "os.kill(os.getpid(), signal.SIGTERM)",
        "os.kill(os.getpid(), signal.SIGINT)\n            os.kill(os.getpid(), signal.SIGTERM)",
    )
    (tmp_path / "sitecustomize.py").write_text(site)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [LOWBIT, "recipes"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert (done.returncode, done.stderr, done.stdout) == (130, TERMINATED, "")


# Imported at start-up by every Python of the subprocess (PYTHONPATH): torch's import is stuck (a
# cold network file system, say) after a Ctrl-C came, and the file MARK says so.
STUCK_IMPORT = """
import os, signal, sys, time

class StuckImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
            open("MARK", "w").close()
            time.sleep(600)
        return None

sys.meta_path.insert(0, StuckImport())
"""


def test_a_second_ctrl_c_ends_a_stuck_torch_import(tmp_path):
    """Signals were blocked until torch's import ended: no Ctrl-C could end a slow or stuck one."""
    mark = tmp_path / "stuck"
    (tmp_path / "sitecustomize.py").write_text(STUCK_IMPORT.replace("MARK", str(mark)))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    process = subprocess.Popen(
        [LOWBIT, "recipes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 300
        while not mark.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert (process.returncode, stderr, stdout) == (130, "lowbit: interrupted\n", "")


def test_a_program_that_imports_lowbit_gets_its_ctrl_c_during_torchs_import(tmp_path):
    """The command holds a Ctrl-C until torch has loaded: a program that imports lowbit gets its
    KeyboardInterrupt where it came, before torch had loaded, as any program does."""
    site = TERMINATE_IMPORT.replace("MODULE", "torch").replace("SIGTERM", "SIGINT")
    (tmp_path / "sitecustomize.py").write_text(site)
    program = (
        "import sys\ntry:\n    import lowbit\nexcept KeyboardInterrupt:\n"
        "    print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n"
        "    sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert (done.returncode, done.stdout) == (3, "torch not loaded\n"), done.stderr


# Imported at start-up by every Python of the subprocess (PYTHONPATH): a SIGTERM as `lowbit
# doctor` starts to handle one (`_interruptible`), so that its probe stops after a step.
TERMINATE_PROBE = """
import os, signal

plain = signal.signal

def terminate_as_the_probe_handles_it(signum, handler):
    previous = plain(signum, handler)
    if signum == signal.SIGTERM and "_interruptible" in getattr(handler, "__qualname__", ""):
        signal.signal = plain
        os.kill(os.getpid(), signal.SIGTERM)
    return previous

signal.signal = terminate_as_the_probe_handles_it
"""


def test_sigterms_repeated_after_the_probe_stopped_let_doctor_write_its_diagnosis(tmp_path):
    """A SIGTERM after the probe had stopped on the first raised in the diagnosis: no table, no
    doctor.png, no `wrote` line."""
    (tmp_path / "sitecustomize.py").write_text(TERMINATE_PROBE)
    out = tmp_path / "doctor"
    command = [LOWBIT, "doctor", "--task", "image-classification", "--probe-steps", "50"]
    command += ["--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    out_lines, err_lines = _Lines(process.stdout), _Lines(process.stderr)
    try:
        assert err_lines.wait_for("terminated (SIGTERM): the probe stops"), err_lines.text()
        while process.poll() is None:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            process.kill()
    stdout, stderr = out_lines.text(), err_lines.text()
    assert process.returncode == 130, stderr
    assert "probe interrupted after 1 of 50 steps" in stdout, stdout
    assert stdout.endswith(f"wrote {out / 'doctor.json'} and {out / 'doctor.png'}\n"), stdout
    assert "Traceback" not in stderr


# Imported at start-up by every Python of the subprocess (PYTHONPATH): a SIGTERM as `lowbit
# compare` has just set its SIGINT handler, before the study is read or written.
TERMINATE_COMPARE = """
import os, signal

plain = signal.signal

def terminate_as_compare_starts(signum, handler):
    previous = plain(signum, handler)
    if signum == signal.SIGINT and getattr(handler, "__name__", "") == "raise_interrupt":
        signal.signal = plain
        os.kill(os.getpid(), signal.SIGTERM)
    return previous

signal.signal = terminate_as_compare_starts
"""


def test_a_sigterm_as_compare_starts_is_named(tmp_path):
    """compare said "interrupted" for a SIGTERM, where `lowbit train` names it."""
    (tmp_path / "sitecustomize.py").write_text(TERMINATE_COMPARE)
    out = tmp_path / "study"
    command = [LOWBIT, "compare", "--task", "image-classification", "--recipes", "fp32"]
    command += ["--steps", "2", "--seeds", "1", "--no-plots", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    said = "lowbit: terminated (SIGTERM); run the same command again to resume"
    assert (done.returncode, done.stderr.startswith(said)) == (130, True), done.stderr
    assert not out.exists()
