"""scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped with sklearn, no download).

Images are float32 tensors (N, 1, 8, 8) in [0, 1] (pixel counts 0-16 divided by 16), labels int64.
The split is stratified by class and fixed by ``seed``: 70% train, 15% validation, 15% test. Use
`lowbit.data.batches.TensorBatches` for training batches and `fixed_batches` for evaluation.
"""

from __future__ import annotations

import torch

NUM_CLASSES = 10
PIXEL_MAX = 16.0  # the dataset's pixels are counts of set bits in 4x4 blocks: 0..16
EVAL_FRACTION = 0.15


def load_digit_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train" | "validation" | "test": (images, labels)}``, stratified and seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / PIXEL_MAX
    labels = torch.tensor(data.target, dtype=torch.long)
    index = torch.arange(len(labels)).numpy()
    rest, test = train_test_split(
        index, test_size=EVAL_FRACTION, stratify=labels.numpy(), random_state=seed
    )
    train, validation = train_test_split(
        rest,
        test_size=EVAL_FRACTION / (1 - EVAL_FRACTION),
        stratify=labels.numpy()[rest],
        random_state=seed,
    )
    parts = {"train": train, "validation": validation, "test": test}
    return {name: (images[rows], labels[rows]) for name, rows in parts.items()}
