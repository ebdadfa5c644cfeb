"""scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped with sklearn, no download).

Images are float32 tensors (N, 1, 8, 8) in [0, 1] (pixel counts 0-16 divided by 16), labels int64.
The split is stratified by class and fixed by ``seed``: 70% train, 15% validation, 15% test. Use
`lowbit.data.batches.TensorBatches` for training batches and `fixed_batches` for evaluation.

The pixels, labels and split are cached on disk (`lowbit.data.cache`, ``digits``) once per
version of scikit-learn and numpy: importing scikit-learn took about a second of CPU in every
process that builds the task (each test subprocess, each `lowbit compare --jobs` worker). An
entry that is not a whole split of the whole dataset (`_read`) is a miss, made again.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from lowbit.data.cache import JsonCache, digest

NUM_CLASSES = 10
NUM_IMAGES = 1797
PIXELS = 64  # 8 x 8
PIXEL_MAX = 16.0  # the dataset's pixels are counts of set bits in 4x4 blocks: 0..16
EVAL_FRACTION = 0.15
SPLITS = ("train", "validation", "test")


def load_digit_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train" | "validation" | "test": (images, labels)}``, stratified and seeded."""
    cache = JsonCache("digits", _generation())
    key = digest(str(seed))
    data = _read(cache.get(key))
    if data is None:
        entry = _split_with_sklearn(seed)
        cache.put(key, entry)
        data = _tensors(entry)
    pixels, labels, rows = data
    # the pixels as scikit-learn gives them (float64 counts), exact in float32 and after / 16
    images = pixels.to(torch.float32).reshape(-1, 1, 8, 8) / PIXEL_MAX
    return {name: (images[rows[name]], labels[rows[name]]) for name in SPLITS}


def _tensors(entry: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """An entry's pixels (flat), labels and each split's row numbers, as tensors."""
    rows = {name: torch.tensor(entry[name]) for name in SPLITS}
    return torch.tensor(entry["pixels"]), torch.tensor(entry["labels"]), rows


def _read(entry) -> tuple | None:
    """`_tensors` of a cached entry that `_split_with_sklearn` could have made; None (a miss)
    for anything else: an entry edited by hand, with its checksum made to match, crashed the run
    (a row number past the data) or trained on less data (a row left out of every split)."""
    if not isinstance(entry, dict) or entry.keys() != {"pixels", "labels", *SPLITS}:
        return None
    try:
        pixels, labels, rows = _tensors(entry)
    except (TypeError, ValueError, RuntimeError):  # not a flat list of numbers
        return None
    if not (
        pixels.shape == (NUM_IMAGES * PIXELS,)
        and pixels.is_floating_point()
        and bool(((pixels >= 0) & (pixels <= PIXEL_MAX)).all())  # NaN too is out
        and labels.shape == (NUM_IMAGES,)
        and labels.dtype == torch.int64
        and bool(((labels >= 0) & (labels < NUM_CLASSES)).all())
        and all(r.dtype == torch.int64 and r.dim() == 1 for r in rows.values())
    ):
        return None
    every = torch.cat(list(rows.values())).sort().values
    return (pixels, labels, rows) if torch.equal(every, torch.arange(NUM_IMAGES)) else None


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
