"""Fixtures: the astronaut face (skimage) as a reference file, non-face files, and a tiny FAN
checkpoint (FAN(1), face-alignment's own class) saved as a plain state dict, like 2DFAN-4's file."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory) -> Path:
    from skimage.data import astronaut

    path = tmp_path_factory.mktemp("faces") / "astronaut.png"
    Image.fromarray(astronaut()).save(path)
    return path


@pytest.fixture(scope="session")
def other_png(tmp_path_factory) -> Path:
    from skimage.data import coffee

    path = tmp_path_factory.mktemp("faces") / "coffee.png"
    Image.fromarray(coffee()).save(path)
    return path


@pytest.fixture(scope="session")
def grey_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faces") / "grey.png"
    Image.fromarray(np.full((128, 128, 3), 128, dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_fan(tmp_path_factory):
    from face_alignment.models.fan import FAN

    torch.manual_seed(0)
    model = FAN(1).eval()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=gen))
    path = tmp_path_factory.mktemp("weights") / "2DFAN4-11f355bf06.pth.tar"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are small: one intra-op thread is as fast on a quiet 2-core machine and far
    steadier on a shared one (a descheduled OpenMP thread stalls every operator)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
