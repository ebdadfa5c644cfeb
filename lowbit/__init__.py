"""lowbit: train language models in mixed and low precision, and measure what it costs."""

import os
import sys

from lowbit.errors import stop_on_sigterm, stops_held  # no torch: before torch's import

# PyTorch's switch for transparent huge pages on large CPU tensors (c10 reads it once, when torch
# first allocates): a fresh 32 MB tensor then costs ~16 instead of ~8000 page faults, which raises
# fp8 tensorwise quantization from 26% to 37% of copy bandwidth here (docs/formats.md, with the
# cases where it costs). It only takes effect when lowbit is imported before torch (the `lowbit`
# command is); an explicit value, e.g. THP_MEM_ALLOC_ENABLE=0, wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _started_as_command() -> bool:
    """True when this import is the start of the `lowbit` command: its console script, or
    ``python -m lowbit`` (runpy imports the package while ``sys.argv[0]`` is still ``"-m"``, and
    the command line ends with the module's name and the command's arguments)."""
    argv = getattr(sys, "argv", None) or [""]
    if os.path.basename(argv[0]) == "lowbit":
        return True
    if argv[0] != "-m" or len(sys.orig_argv) < len(argv):
        return False
    module = sys.orig_argv[-len(argv)]  # "lowbit", or "-mlowbit" when written together
    if module.startswith("-"):
        module = module[module.index("m") + 1 :]
    return module in ("lowbit", "lowbit.cli", "lowbit.__main__")


def _spawned() -> bool:
    """True in a process that multiprocessing spawned: its command line ends with the flag that
    says so (`multiprocessing.spawn`), and it imports lowbit as it runs its parent's script again,
    before `multiprocessing.parent_process` is set."""
    return "--multiprocessing-fork" in getattr(sys, "orig_argv", [])


# Importing torch takes about a second, before `lowbit.cli.main` can catch a Ctrl-C: the command
# answers one made then as main does (its line, status 130) instead of with a traceback through
# torch's import, while `import lowbit` in a user's program raises KeyboardInterrupt as usual.
# So is a SIGTERM, which killed the command there without a line (not in a process the command
# spawned, a rank or a `compare --jobs` worker, which runs its script again: its parent reads
# the signal it died of). During torch's import one is noted and acts once it ends, a second
# ends the command at once (`stops_held`): raised there, its C++ start-up aborted the process.
if _started_as_command() and not _spawned():
    stop_on_sigterm()
try:
    with stops_held(_started_as_command()):
        import torch  # noqa: F401 -- imported here whole, before the modules that use it
    from lowbit import quiet_torchao
    from lowbit.allocator import keep_freed_memory
    from lowbit.nn import convert
    from lowbit.precision import Precision
    from lowbit.recipes import Recipe, get_recipe
    from lowbit.recipes import names as recipe_names

    # Freed activation buffers are reused instead of unmapped and faulted in again every step
    # (glibc; lowbit/allocator.py says what it measured and costs; LOWBIT_MALLOC=0 turns it off).
    keep_freed_memory()
    quiet_torchao.install()  # torchao's log noise on a CPU-only torch (lowbit/quiet_torchao.py)
except (KeyboardInterrupt, RuntimeError) as error:
    from lowbit.errors import interrupted_line, is_interrupt

    if not is_interrupt(error) or not _started_as_command():
        raise
    print(interrupted_line(error), file=sys.stderr)
    raise SystemExit(130) from None

__version__ = "0.1.0"

__all__ = ["Precision", "Recipe", "__version__", "convert", "get_recipe", "recipe_names"]
