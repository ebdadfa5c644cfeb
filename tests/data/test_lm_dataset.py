import pytest
import torch

from lowbit.data.lm_dataset import LMBatches, eval_batches, tokenize_split
from lowbit.data.tokenizers import ByteTokenizer
from lowbit.errors import UsageError

TOKENS = torch.arange(5000, dtype=torch.int32)  # token value == position: windows are checkable


def take(batches, count):
    return [next(batches) for _ in range(count)]


def test_windows_are_contiguous_and_labels_shifted():
    inputs, labels = next(LMBatches(TOKENS, batch_size=8, seq_len=32, seed=0))
    assert inputs.shape == labels.shape == (8, 32)
    assert inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(labels, inputs + 1)
    assert torch.equal(inputs, inputs[:, :1] + torch.arange(32))
    assert int(labels.max()) < len(TOKENS)


def test_same_seed_same_batches_other_seed_differs():
    a = take(LMBatches(TOKENS, 4, 16, seed=3), 5)
    b = take(LMBatches(TOKENS, 4, 16, seed=3), 5)
    c = take(LMBatches(TOKENS, 4, 16, seed=4), 5)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])  # steps differ


def test_resume_from_state_dict_continues_identically():
    uninterrupted = take(LMBatches(TOKENS, 4, 16, seed=7), 10)
    first = LMBatches(TOKENS, 4, 16, seed=7)
    take(first, 6)
    state = first.state_dict()
    del first
    resumed = LMBatches(TOKENS, 4, 16, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (u, v) in zip(take(resumed, 4), uninterrupted[6:]):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_resume_with_other_shapes_is_refused():
    state = LMBatches(TOKENS, 4, 16).state_dict()
    with pytest.raises(UsageError, match="seq_len saved 16 now 32"):
        LMBatches(TOKENS, 4, 32).load_state_dict(state)


def test_eval_batches_cover_every_label_once_and_are_fixed():
    tokens = torch.arange(1001, dtype=torch.int32)
    batches = eval_batches(tokens, batch_size=3, seq_len=100)
    labels = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(labels, torch.arange(1, 1001))
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    again = eval_batches(tokens, batch_size=3, seq_len=100)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_capped_eval_batches_spread_over_the_split():
    batches = eval_batches(TOKENS, batch_size=2, seq_len=10, max_batches=2)
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert len(starts) == 4
    assert int(starts[0]) == 0 and int(starts[-1]) > 4900  # first and last windows kept
    assert len(set(starts.tolist())) == 4


def test_too_little_data():
    with pytest.raises(UsageError, match="fewer than one window"):
        LMBatches(torch.arange(10, dtype=torch.int32), 2, 10)
    with pytest.raises(UsageError, match="fewer than one window"):
        eval_batches(torch.arange(10, dtype=torch.int32), 2, 10)


def test_tokenize_split_byte_tokens():
    tokens = tokenize_split(ByteTokenizer(), ["ab", "c"])
    assert tokens.tolist() == [97, 98, 256, 99]
