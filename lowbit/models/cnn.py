"""A small CNN for 1x8x8 digit images: two Conv2d + ReLU blocks, a 2x2 max-pool, a Linear head."""

from __future__ import annotations

import shlex
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import UsageError, choose

SIZES: dict[str, tuple[int, int]] = {"tiny": (8, 16), "small": (16, 32)}  # conv channels


class DigitsCNN(nn.Module):
    """``(N, 1, 8, 8)`` images to ``(N, num_classes)`` logits."""

    def __init__(self, channels: tuple[int, int] = (16, 32), num_classes: int = 10):
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, first, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(first, second, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(second * 4 * 4, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


def build_cnn(size: str = "small", num_classes: int = 10, seed: int = 0) -> DigitsCNN:
    """A freshly initialized `DigitsCNN` of a named size; the init depends only on ``seed``."""
    # image-classification trains this CNN: a language model's size or folder is no --model here
    fix = f"--model {' or '.join(SIZES)} for image-classification"
    if size not in SIZES and (run := _run_folder(size)) is not None:
        # a digits run's folder or checkpoint, to train on from: "unknown CNN size" named no way
        if _run_task(run) == "image-classification":
            fix += f" (a new CNN), or --resume {shlex.quote(str(run))} to go on training that one"
        where = "a lowbit run" if Path(size) == run else f"inside the lowbit run {run}"
        raise UsageError(
            f"--model {size}: {where}, not a CNN size; image-classification builds its CNN "
            f"afresh at a size ({', '.join(SIZES)}); fix: {fix}"
        )
    choose("CNN size", size, SIZES, fix=fix)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN(SIZES[size], num_classes)


def _run_folder(path: str) -> Path | None:
    """The lowbit run folder ``path`` is or lies in (`run_folder_above`), or None."""
    from lowbit.models.pretrained import run_folder_above
    from lowbit.train.config import is_run_folder

    return Path(path) if is_run_folder(path) else run_folder_above(Path(path))


def _run_task(run: Path) -> str | None:
    """The task of the run in ``run``; None where its config.yaml cannot be read (its own error
    comes with the run's next use)."""
    from lowbit.train.config import read

    try:
        return read(run).task
    except UsageError:
        return None
