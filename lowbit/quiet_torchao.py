"""Filters for torchao's known log noise on a CPU-only torch, installed by ``import lowbit``.

Transformers imports torchao (one of lowbit's dependencies) when it builds a model. On a CPU-only
torch, torchao then logs a warning for each of its CUDA extensions that cannot load, and torch's
pytree logs a deprecation note for each of the enums torchao registers. Neither concerns anyone
training on a CPU, and both reached users who import lowbit and build a Transformers model
themselves. The filters drop exactly those records: on a torch built with CUDA a failed extension
is a real problem and is still logged, as is every other message of both loggers.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

_TORCHAO_DIR = f"{os.sep}torchao{os.sep}"


def _called_from_torchao() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if _TORCHAO_DIR in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class _ExtensionsOnCpuTorch(logging.Filter):
    """torchao's "Failed to load <its extension>" warnings, where torch has no CUDA."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (torch.version.cuda is None and message.startswith("Failed to load "))


class _EnumRegistrationsOfTorchao(logging.Filter):
    """pytree's "Enum subclass ... register_constant() is deprecated" notes, when torchao calls."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("is an Enum subclass" in record.getMessage() and _called_from_torchao())


def install() -> None:
    """Attach the filters to the two loggers (once: a logger keeps one of each)."""
    for name, kind in (
        ("torchao", _ExtensionsOnCpuTorch),
        ("torch.utils._pytree", _EnumRegistrationsOfTorchao),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
