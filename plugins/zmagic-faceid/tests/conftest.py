"""Fixtures: the astronaut face (skimage) as a reference file, non-face files, and tiny IR-SE
checkpoints saved in the real format (a plain torch.save'd state dict named model_ir_se50.pth)."""
from pathlib import Path

import pytest
import torch

from zmagic_faceid.irse import IRSEBackbone
from zmagic_core.testing import one_thread  # noqa: F401  (autouse)
from zmagic_faceid.testing import astronaut_png, grey_png, other_png  # noqa: F401

TINY_UNITS = [1, 1, 1, 1]
TINY_WIDTHS = [16, 16, 32, 32]


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, so a checkpoint round trip is tested on every tensor."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=gen))


@pytest.fixture(scope="session")
def tiny_arch() -> dict:
    return {"units": TINY_UNITS, "widths": TINY_WIDTHS}


@pytest.fixture(scope="session")
def randomised():
    return randomise_batchnorm


@pytest.fixture(scope="session")
def tiny_arcface(tmp_path_factory) -> tuple[Path, IRSEBackbone]:
    torch.manual_seed(0)
    model = IRSEBackbone(TINY_UNITS, TINY_WIDTHS).eval()
    randomise_batchnorm(model)
    path = tmp_path_factory.mktemp("weights") / "model_ir_se50.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture
def tiny_options(tiny_arcface, astronaut_png) -> dict:
    return {"reference": str(astronaut_png), "weights": str(tiny_arcface[0]),
            "units": TINY_UNITS, "widths": TINY_WIDTHS}

