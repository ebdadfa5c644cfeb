"""lowbit marks functions for Dynamo without importing it: the import took half of every
process's ``import lowbit`` (a CLI call, a rank's launcher, a compare worker), compiling or not."""

import subprocess
import sys

from lowbit.dynamo_marks import assume_constant_result


def test_importing_lowbit_leaves_dynamo_unimported():
    code = "import sys, lowbit, lowbit.cli; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_mark_is_the_one_torchs_decorator_sets():
    """Dynamo reads the attribute `torch.compiler.assume_constant_result` sets; a torch that sets
    another would leave lowbit's functions unmarked (graph breaks, caught by the compile tests)."""
    import torch._dynamo

    def ours():
        return 0

    def theirs():
        return 0

    assume_constant_result(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) == {"_dynamo_marked_constant": True}
