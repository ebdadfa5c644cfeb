import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Many small tensor ops per optimizer step: on a shared, oversubscribed 2-core machine,
    # intra-op threads contend and a step is ~50x slower than on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
