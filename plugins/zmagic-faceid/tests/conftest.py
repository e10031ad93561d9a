"""Fixtures: the astronaut face (skimage) as a reference file, non-face files, and tiny IR-SE
checkpoints saved in the real format (a plain torch.save'd state dict named model_ir_se50.pth)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zmagic_faceid.irse import IRSEBackbone

from faceid_testutils import TINY_UNITS, TINY_WIDTHS, randomise_batchnorm


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory) -> Path:
    from skimage.data import astronaut

    path = tmp_path_factory.mktemp("faces") / "astronaut.png"
    Image.fromarray(astronaut()).save(path)
    return path


@pytest.fixture(scope="session")
def other_png(tmp_path_factory) -> Path:
    """A different image (skimage's coffee): not the reference's identity."""
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
