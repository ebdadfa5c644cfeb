from collections import Counter

import torch
from sklearn.datasets import load_digits

from lowbit.data.digits import NUM_CLASSES, load_digit_splits


def rows(images, labels):
    """A multiset of (pixels, label) rows, pixels back on the dataset's 0..16 scale."""
    pixels = (images.flatten(1) * 16).round().int().tolist()
    return Counter((tuple(p), int(y)) for p, y in zip(pixels, labels))


def test_splits_partition_the_dataset_with_expected_shapes():
    splits = load_digit_splits(seed=0)
    sizes = {name: len(labels) for name, (_, labels) in splits.items()}
    assert sizes["validation"] == sizes["test"] == round(1797 * 0.15)
    for images, labels in splits.values():
        assert images.shape == (len(labels), 1, 8, 8) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    together = sum((rows(*split) for split in splits.values()), Counter())
    data = load_digits()
    full = Counter((tuple(p), int(y)) for p, y in zip(data.data.astype(int).tolist(), data.target))
    assert together == full  # every example exactly once across the three splits


def test_stratified_and_seeded():
    splits = load_digit_splits(seed=0)
    for _, labels in splits.values():
        share = torch.bincount(labels, minlength=NUM_CLASSES).float() / len(labels)
        assert float((share - 0.1).abs().max()) < 0.02
    again = load_digit_splits(seed=0)
    other = load_digit_splits(seed=1)
    assert torch.equal(splits["test"][0], again["test"][0])
    assert not torch.equal(splits["test"][0], other["test"][0])
