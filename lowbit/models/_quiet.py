"""Import torchao (which transformers pulls in when it builds a model) without its log noise.

On a CPU-only torch, torchao logs a warning for each CUDA extension it cannot load, and torch's
pytree logs a deprecation note for torchao's enums; neither concerns lowbit's users.
"""

from __future__ import annotations

import logging


def import_torchao_quietly() -> None:
    names = ("torchao", "torch.utils._pytree")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.prototype.mx_formats  # noqa: F401  (torchao, and the enums it registers)
    except ImportError:
        pass
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
