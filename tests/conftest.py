"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread_module():
    """Torch on one thread for a module's tests (training runs: deterministic and not oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
