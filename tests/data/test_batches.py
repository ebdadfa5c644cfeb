import pytest
import torch

from lowbit.data.batches import TensorBatches, fixed_batches
from lowbit.errors import UsageError


def test_each_epoch_is_a_permutation_and_resume_matches():
    x = torch.arange(10)
    y = x * 10
    batches = TensorBatches((x, y), batch_size=3, seed=1)
    epoch = [next(batches) for _ in range(batches.steps_per_epoch)]
    seen = torch.cat([b[0] for b in epoch])
    assert len(set(seen.tolist())) == 9  # 3 batches of 3, no repeats, one row dropped
    assert all(torch.equal(b[1], b[0] * 10) for b in epoch)  # rows stay aligned
    state = batches.state_dict()
    expected = [next(batches) for _ in range(4)]
    resumed = TensorBatches((x, y), batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(expected, [next(resumed) for _ in range(4)]))


def test_bad_batch_size_and_mismatched_resume():
    x = torch.arange(5)
    with pytest.raises(UsageError, match="batch size 6"):
        TensorBatches((x,), 6)
    with pytest.raises(UsageError, match="cannot resume"):
        TensorBatches((x,), 2, seed=0).load_state_dict(TensorBatches((x,), 2, seed=1).state_dict())


def test_fixed_batches_in_order():
    x = torch.arange(7)
    assert [b[0].tolist() for b in fixed_batches((x,), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
