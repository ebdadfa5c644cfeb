"""Fixtures shared by the precision tests."""

import pytest
import torch.distributed as dist


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one process (DDP needs one), through a file store: no port."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
