"""Session 41: a converted Conv2d's unfolded input is not held alive until the backward.

A converted convolution keeps its image for the weight gradient, not its unfolded input ``cols``
(tests/nn/test_conv_saved_s41.py). But the shared-quantization slot that hands a layer's input
quantization to the next layer reading the same tensor still held the last convolution's ``cols``
and its quantization until the backward started: saved-tensor hooks do not see it, the allocator
does. The digits CNN at batch 256 held 12,907,540 bytes at the backward's start under
fp8-tensorwise, 10,965,000 under int8, against fp32's 4,728,840 (/tmp/s41/g3/live2.py)."""

import torch
import torch.nn.functional as F

import lowbit
from lowbit.memory.measure import Allocations
from lowbit.models.cnn import build_cnn


def _live_at_backward_start(recipe: str) -> int:
    """The bytes the CPU allocator holds at the end of a forward of the digits CNN (batch 64)
    under ``recipe`` above those at its start: what the backward starts with."""
    torch.manual_seed(0)
    precision = lowbit.Precision(recipe)
    model = precision.convert(build_cnn("small"))
    images, labels = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))

    def forward() -> torch.Tensor:
        with precision.autocast():
            return F.cross_entropy(model(images).float(), labels)

    precision.backward(forward())  # a step before, as in training
    model.zero_grad(set_to_none=False)
    with Allocations() as allocations:
        allocations.mark("start")
        loss = forward()
        allocations.mark("backward")
        precision.backward(loss)
    start, end = allocations.marks["start"][0], allocations.marks["backward"][0]
    return sum(nbytes for stamp, nbytes in allocations.events if start <= stamp < end)


def test_a_converted_cnn_starts_its_backward_holding_less_than_in_fp32():
    """fp32 holds every activation its backward needs; a converted CNN keeps images, not the
    unfolded inputs, so it holds less (it held 2.3-2.7x fp32's bytes: the last convolution's
    unfolded input and its quantization, alive in the shared slot)."""
    fp32 = _live_at_backward_start("fp32")
    for recipe in ("fp8-tensorwise", "int8", "fp8-rowwise"):
        live = _live_at_backward_start(recipe)
        assert 0 < live < fp32, (recipe, live, fp32)
