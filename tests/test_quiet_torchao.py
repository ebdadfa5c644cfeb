"""`import lowbit` drops torchao's known log noise on a CPU-only torch, and nothing else."""

import logging
import subprocess
import sys

import pytest
import torch

import lowbit  # noqa: F401  (installs the filters)

BUILD_A_TRANSFORMERS_MODEL = (
    "from transformers import GPT2Config, GPT2LMHeadModel; "
    "GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2))"
)
NOISE = ("Failed to load", "is an Enum subclass")


def _stderr(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="the noise is a CPU-only torch's")
def test_building_a_transformers_model_after_import_lowbit_is_quiet():
    # the noise comes from torchao's import, which building the model imports: the library
    # alone tells whether it logs any (without transformers' import, seconds of CPU)
    without = _stderr("import torchao")
    if not any(text in without for text in NOISE):
        pytest.skip("this torchao logs none of the noise the filters drop")
    with_lowbit = _stderr("import lowbit; " + BUILD_A_TRANSFORMERS_MODEL)
    assert not any(text in with_lowbit for text in NOISE), with_lowbit


def test_only_the_known_records_are_dropped(caplog, monkeypatch):
    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING):
        monkeypatch.setattr(torch.version, "cuda", None)
        torchao.warning("Failed to load /x/torchao/_C_mxfp8.so: could not load this library")
        torchao.warning("some other torchao warning")
        pytree.warning(
            "<enum 'Mode'> is an Enum subclass and is now natively supported"
        )  # not torchao's
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        torchao.warning("Failed to load /x/torchao/_C_cutlass.so: undefined symbol")  # CUDA torch
    assert [record.getMessage()[:30] for record in caplog.records] == [
        "some other torchao warning",
        "<enum 'Mode'> is an Enum subcl",
        "Failed to load /x/torchao/_C_c",
    ]
