"""Public pytest fixtures and test doubles (fake entry points and distributions) for the core's and
plugins' test suites: ``from zmagic_core.testing import one_thread`` in a conftest.py
(the one submodule besides the top-level API that plugins may import)."""
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


class FakeEntryPoint:
    """An entry point of group ``zmagic`` whose ``load()`` returns ``module``, or raises it when it is
    an exception: registry tests without installing a distribution."""

    def __init__(self, name, module):
        self.name, self.group, self.module = name, "zmagic", module

    def load(self):
        if isinstance(self.module, BaseException):
            raise self.module
        return self.module


class FakeDist:
    """A distribution with a name, a version and entry points, as importlib.metadata gives them."""

    def __init__(self, name, version, eps):
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = eps
