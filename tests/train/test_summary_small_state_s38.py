"""Session 38: the summary's state size of a model under 0.1 MiB (the digits CNN's)."""

import re

from lowbit.train import TrainConfig, train


def test_the_digits_cnns_state_is_given_in_kib_not_as_zero_mib(tmp_path):
    """The digits CNN's parameters, optimizer moments and precision state, 45 KiB, read
    "parameters, optimizer and precision state 0.0 MiB" in every recipe, as if it held nothing.
    (Most of this test's first-run time is importing torch._dynamo, which AdamW does.)"""
    config = TrainConfig(
        task="image-classification",
        model="tiny",
        recipe="fp32",
        steps=1,
        batch_size=8,
        out=str(tmp_path / "run"),
    )
    line = next(line for line in train(config, quiet=True).summary().splitlines() if "RSS" in line)
    # 3,818 parameters in fp32 (15,272 B) and AdamW's two moments (30,544 B): 44.6 KiB and more
    size = re.search(r"precision state ([\d.]+) KiB", line)
    assert size and 44 < float(size[1]) < 50, line
