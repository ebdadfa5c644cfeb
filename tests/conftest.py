"""Suite-wide settings.

Every test runs torch on one thread. The suite's models and tensors are tiny, so intra-op
threads buy nothing and, with pytest-xdist workers or other jobs sharing 2 cores, their
contention made steps up to ~50x slower. One thread keeps the suite fast and its timing stable.
"""

import os
import signal

import pytest
import torch

from tests.once import shared_base


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def default_sigint():
    """Every test starts with Python's own SIGINT handler. Tests ignore SIGINT (as a shell
    script's background job starts) or send it to their own process; an interrupt racing a
    restore would leave it ignored for the later tests of that worker, and for the processes they
    start (a `lowbit compare` subprocess that then never hears its SIGINT)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session", autouse=True)
def bf16_gemms_as_native():
    """Every test, and the processes it starts, runs as on a CPU with bf16 GEMM instructions:
    `lowbit train` warns of bf16 recipes on one without them (`lowbit.cpu`), which would change
    the output the tests read by machine. tests/train/test_cpu_bf16_s35.py sets it otherwise."""
    from lowbit.cpu import BF16_GEMMS_ENV

    before = os.environ.get(BF16_GEMMS_ENV)
    os.environ[BF16_GEMMS_ENV] = "native"
    yield
    if before is None:
        del os.environ[BF16_GEMMS_ENV]
    else:
        os.environ[BF16_GEMMS_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Build (or load) the fused kernels before any test runs: a first build prints a line on
    stderr, which would land in whichever test's captured output came first (and fail a test that
    checks for a one-line error)."""
    from lowbit import kernels

    kernels.available()


@pytest.fixture(scope="session", autouse=True)
def transformers_log_handler():
    """Give transformers' log handler its stream before any test runs: made during a test that
    captures stderr (``capsys``), it kept that test's stream, closed once the test ended, and a
    later test's warning (a model's load report) printed "--- Logging error --- Traceback" into
    whichever test's output came next, failing a test that checks for a one-line error."""
    from transformers.utils import logging

    logging.get_logger("transformers")


@pytest.fixture(scope="session", autouse=True)
def lowbit_cache_dir(tmp_path_factory):
    """lowbit's on-disk cache (`lowbit.data.cache`) in a folder of this session's, never the
    user's home, so that every session starts cold. Set in ``os.environ`` for the subprocesses
    tests start; one folder for all pytest-xdist workers, whose own base folders (``gw0``, ...)
    lie in the session's, so the workers share what one of them tagged."""
    base = shared_base(tmp_path_factory)
    before = os.environ.get("LOWBIT_CACHE_DIR")
    os.environ["LOWBIT_CACHE_DIR"] = str(base / "lowbit-cache")
    yield
    if before is None:
        del os.environ["LOWBIT_CACHE_DIR"]
    else:
        os.environ["LOWBIT_CACHE_DIR"] = before
