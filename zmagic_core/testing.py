"""Public pytest fixtures for the core's and plugins' test suites: ``from zmagic_core.testing import
one_thread`` in a conftest.py (the one submodule besides the top-level API that plugins may import)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Test tensors are small: one intra-op thread is as fast on a quiet 2-core machine and far
    steadier on a shared one (a descheduled OpenMP thread stalls every operator). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
