"""Shared by every test file: tiny models run on one thread."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread: threads only add overhead, and on a busy 2-core CPU they
    thrash (backprop through 100 tokens took 9-20 s on two threads beside another process, 0.6 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
