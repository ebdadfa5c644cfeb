"""A batch size larger than the training split names the largest that fits (session 33)."""

import pytest
import torch

from lowbit.data import TensorBatches
from lowbit.errors import UsageError


def test_a_batch_larger_than_the_split_names_the_largest_that_fits():
    """It read "batch size 11 needs 1..10 examples; fix: lower it": to what, it did not say."""
    with pytest.raises(UsageError) as refused:
        TensorBatches((torch.zeros(10, 2),), batch_size=11)
    assert str(refused.value) == (
        "batch size 11 is more than the 10 training examples there are; "
        "fix: --batch-size 10 or less"
    )
    assert len(TensorBatches((torch.zeros(10, 2),), batch_size=10).tensors[0]) == 10
