"""Set before CUDA starts: cuBLAS's deterministic workspace, which `torch.use_deterministic_algorithms`
requires (tests that compare two GPU runs bit for bit switch that mode on)."""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
