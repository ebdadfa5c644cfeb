"""Session 38: a Ctrl-C that lands in a class's ``__set_name__`` as the `lowbit` command starts.
Python 3.11 raises "RuntimeError: Error calling __set_name__ ..." in its place, the
KeyboardInterrupt its cause: the command printed that traceback and exited 1, where any other
Ctrl-C at start-up is its one line (tests/commands/test_cli_polish_s34.py). A real Ctrl-C met it
in `platform`'s class ``uname_result`` as torch imports it (a busy machine, the test of a real
Ctrl-C at start-up there)."""

import pytest

from tests.commands.test_cli_polish_s34 import BIN, INTERRUPTED, _interrupted

# Imported at start-up by every Python of the subprocess (PYTHONPATH): the first import of the
# module MODULE makes a class whose attribute's ``__set_name__`` meets a Ctrl-C. torch is imported
# by lowbit's own import, lowbit.commands.formats as `lowbit.cli.main` builds the command line.
INTERRUPT_IN_SET_NAME = """
import os, signal, sys

class Interrupted:
    def __set_name__(self, owner, name):
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))  # Python code, where Python's own handler raises KeyboardInterrupt

class InterruptInSetName:
    def find_spec(self, name, path=None, target=None):
        if name == "MODULE":
            sys.meta_path.remove(self)
            type("Owner", (), {"attribute": Interrupted()})
        return None

sys.meta_path.insert(0, InterruptInSetName())
"""


@pytest.mark.parametrize("module", ["torch", "lowbit.commands.formats"])
def test_a_ctrl_c_in_a_set_name_at_start_up_is_one_line(tmp_path, module):
    site = INTERRUPT_IN_SET_NAME.replace("MODULE", module)
    done = _interrupted(tmp_path, [str(BIN / "lowbit"), "recipes"], site)
    assert (done.returncode, done.stderr, done.stdout) == (130, INTERRUPTED, "")
