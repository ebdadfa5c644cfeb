"""A small CNN for 1x8x8 digit images: two Conv2d + ReLU blocks, a 2x2 max-pool, a Linear head."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import choose

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
    choose("CNN size", size, SIZES, fix=f"--model {' or '.join(SIZES)} for image-classification")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN(SIZES[size], num_classes)
