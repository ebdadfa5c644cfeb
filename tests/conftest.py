"""Suite-wide settings.

Under pytest-xdist every worker is its own process; with torch's default of one thread per core
the workers oversubscribe the machine (2 workers x 2 threads on 2 cores) and small kernels slow
down several-fold. One thread per worker keeps the suite fast and its timing stable.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
