"""Shared fixtures: a random-weight BiSeNet saved in the public 79999_iter.pth format, and images."""
import pytest
import torch

from zmagic_core import render, save_image
from zmagic_core.testing import one_thread  # noqa: F401  (autouse)
from zmagic_parsing.bisenet import BiSeNet


@pytest.fixture(scope="session")
def shapes_image():
    """``render(shape, color, position, size)``: a prototype image of the shapes world."""
    return render


def random_bisenet(seed: int = 0) -> BiSeNet:
    """Random weights, with non-trivial BatchNorm statistics as a trained checkpoint would have."""
    torch.manual_seed(seed)
    net = BiSeNet(19)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.num_batches_tracked.fill_(79999)
    return net.eval()


@pytest.fixture(scope="session")
def net():
    """One random-weight BiSeNet for the session (building one takes a noticeable fraction of a second)."""
    return random_bisenet(0)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, net):
    """Path to ``net`` saved exactly as the public checkpoint is: torch.save(state_dict)."""
    path = tmp_path_factory.mktemp("weights") / "79999_iter.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Two different 32 px pictures saved as PNG: (reference path, other path)."""
    folder = tmp_path_factory.mktemp("images")
    ref, other = folder / "reference.png", folder / "other.png"
    save_image(render("circle", "red", "center", 32), ref)
    save_image(render("square", "blue", "left", 32), other)
    return ref, other
