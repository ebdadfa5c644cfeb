"""The small MLP and the seeded training steps that the wrapper tests of session 43 share."""

import torch
import torch.nn.functional as F
from torch import nn


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)
    )


def _steps(precision, model, optimizer, steps) -> list[float]:
    losses = []
    for i in steps:
        generator = torch.Generator().manual_seed(i)
        x = torch.randn(16, 32, generator=generator)
        y = torch.randint(0, 8, (16,), generator=generator)
        with precision.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
