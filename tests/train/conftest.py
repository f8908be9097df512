"""Shared by the training tests that run real fine-tunes of the embedded model."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: the box is shared, one thread is faster here, and the reduction order (so the losses that
    resume tests compare to 1e-6) is the same in every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
