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


def assert_path_option_contract(recipe, option: str, resolved, other_contents) -> dict:
    """A plugin's path option as a user meets it, on ``recipe`` (a file whose condition 0 names the option
    relatively): ``zmagic check`` passes and names a missing file by field, the path resolves against the
    recipe's folder, the pipeline builds, and new contents at the same path change the run folder's identity
    (``other_contents``: a file to copy over ``resolved``).  Returns the checked plan."""
    import shutil

    from zmagic_core import build_pipeline, check_recipe, load_recipe
    from zmagic_core.app.identity import folder_identity, identity_differences
    from zmagic_core.assembly.build import find_problems

    field = f"conditions.0.options.{option}"
    assert find_problems(recipe) == []
    missing = find_problems(recipe, [f"conditions.0.{option}=w/nope.bin"])
    assert len(missing) == 1 and missing[0].startswith(f"{field}: file not found"), missing
    plan = check_recipe(load_recipe(recipe, check=False))
    assert plan.parts["conditions.0"][1][option] == str(resolved)
    build_pipeline(plan)
    before = folder_identity(plan)
    shutil.copy(other_contents, resolved)  # same path, other contents
    assert identity_differences(before, folder_identity(plan)) == [f"{field} (file contents)"]
    return plan
