"""scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped with sklearn, no download).

Images are float32 tensors (N, 1, 8, 8) in [0, 1] (pixel counts 0-16 divided by 16), labels int64.
The split is stratified by class and fixed by ``seed``: 70% train, 15% validation, 15% test. Use
`lowbit.data.batches.TensorBatches` for training batches and `fixed_batches` for evaluation.

The pixels, labels and split are cached on disk (`lowbit.data.cache`, ``digits``) once per
version of scikit-learn and numpy: importing scikit-learn took about a second of CPU in every
process that builds the task (each test subprocess, each `lowbit compare --jobs` worker).
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from lowbit.data.cache import JsonCache, digest

NUM_CLASSES = 10
PIXEL_MAX = 16.0  # the dataset's pixels are counts of set bits in 4x4 blocks: 0..16
EVAL_FRACTION = 0.15
SPLITS = ("train", "validation", "test")


def load_digit_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train" | "validation" | "test": (images, labels)}``, stratified and seeded."""
    cache = JsonCache("digits", _generation())
    key = digest(str(seed))
    entry = cache.get(key)
    if entry is None:
        entry = _split_with_sklearn(seed)
        cache.put(key, entry)
    # the pixels as scikit-learn gives them (float64 counts), exact in float32 and after / 16
    images = torch.tensor(entry["pixels"], dtype=torch.float32).reshape(-1, 1, 8, 8) / PIXEL_MAX
    labels = torch.tensor(entry["labels"], dtype=torch.long)
    return {name: (images[entry[name]], labels[entry[name]]) for name in SPLITS}


def _split_with_sklearn(seed: int) -> dict:
    """The cache entry: every image's pixels (flat), every label, and each split's row numbers."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    index = torch.arange(len(data.target)).numpy()
    rest, test = train_test_split(
        index, test_size=EVAL_FRACTION, stratify=data.target, random_state=seed
    )
    train, validation = train_test_split(
        rest,
        test_size=EVAL_FRACTION / (1 - EVAL_FRACTION),
        stratify=data.target[rest],
        random_state=seed,
    )
    return {
        "pixels": data.images.reshape(-1).tolist(),
        "labels": data.target.tolist(),
        "train": train.tolist(),
        "validation": validation.tolist(),
        "test": test.tolist(),
    }


@functools.cache
def _generation() -> str | None:
    """What an entry depends on besides the seed: this module's code and the versions of
    scikit-learn (the data and its split) and numpy (the split's random draws). None, no
    caching, where either cannot be read."""
    import numpy

    try:
        code = Path(__file__).read_bytes()
        sklearn_version = version("scikit-learn")
    except (OSError, PackageNotFoundError):
        return None
    return digest(code, sklearn_version, numpy.__version__)[:20]
