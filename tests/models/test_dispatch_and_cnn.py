import pytest
import torch

from lowbit.errors import UsageError
from lowbit.models import TASKS, build_model
from lowbit.models.cnn import build_cnn


def test_cnn_forward_and_learns_a_batch():
    model = build_model("image-classification", "tiny", seed=0)
    images = torch.rand(16, 1, 8, 8)
    labels = torch.arange(16) % 10
    assert model(images).shape == (16, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
    layers = [type(m).__name__ for m in model.modules()]
    assert "Conv2d" in layers and "Linear" in layers


def test_cnn_seeded():
    a, b = build_cnn("small", seed=1), build_cnn("small", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_dispatch_builds_each_task():
    lm = build_model("causal-lm", "tiny", vocab_size=257)
    assert lm.config.vocab_size == 257
    tagger = build_model("token-classification", "tiny", labels=["O", "B-X"], vocab_size=50)
    assert tagger.num_labels == 2
    assert TASKS == ("causal-lm", "token-classification", "image-classification")


@pytest.mark.parametrize(
    ("task", "name", "message"),
    [("translation", "tiny", "unknown task 'translation'; valid tasks: causal-lm"),
     ("causal-lm", "gigantic", r"gigantic: not a Hugging Face checkpoint folder .* size \(nano, tiny, small"),
     ("image-classification", "huge", "unknown CNN size 'huge'; valid CNN sizes: tiny, small")],
)  # fmt: skip
def test_dispatch_errors_list_valid_names(task, name, message):
    with pytest.raises(UsageError, match=message):
        build_model(task, name)
