"""lowbit: train language models in mixed and low precision, and measure what it costs."""

import os

# PyTorch's switch for transparent huge pages on large CPU tensors (c10 reads it once, when torch
# first allocates): a fresh 32 MB tensor then costs ~16 instead of ~8000 page faults, which raises
# fp8 tensorwise quantization from 26% to 37% of copy bandwidth here (docs/formats.md, with the
# cases where it costs). It only takes effect when lowbit is imported before torch (the `lowbit`
# command is); an explicit value, e.g. THP_MEM_ALLOC_ENABLE=0, wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from lowbit import quiet_torchao
from lowbit.allocator import keep_freed_memory
from lowbit.nn import convert
from lowbit.precision import Precision
from lowbit.recipes import Recipe, get_recipe
from lowbit.recipes import names as recipe_names

# Freed activation buffers are reused instead of unmapped and faulted in again every step (glibc;
# lowbit/allocator.py says what it measured and costs; LOWBIT_MALLOC=0 turns it off).
keep_freed_memory()
quiet_torchao.install()  # torchao's log noise on a CPU-only torch (lowbit/quiet_torchao.py)

__version__ = "0.1.0"

__all__ = ["Precision", "Recipe", "__version__", "convert", "get_recipe", "recipe_names"]
