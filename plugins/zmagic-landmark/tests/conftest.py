"""Fixtures: the astronaut face (skimage) as a reference file, non-face files, and a tiny FAN
checkpoint (FAN(1), face-alignment's own class) saved as a plain state dict, like 2DFAN-4's file."""

import pytest
import torch
from zmagic_core.testing import one_thread  # noqa: F401  (autouse)
from zmagic_faceid.testing import astronaut_png, grey_png, other_png  # noqa: F401


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

