"""Test fixtures of this plugin's suite: skimage's astronaut (a face MTCNN finds), a non-face photo
and a flat grey image, written as PNG reference files (imported by tests/conftest.py)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _save(tmp_path_factory, name: str, array: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("faces") / name
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory) -> Path:
    from skimage.data import astronaut

    return _save(tmp_path_factory, "astronaut.png", astronaut())


@pytest.fixture(scope="session")
def other_png(tmp_path_factory) -> Path:
    """A different image (skimage's coffee): not the reference's identity, no face."""
    from skimage.data import coffee

    return _save(tmp_path_factory, "coffee.png", coffee())


@pytest.fixture(scope="session")
def grey_png(tmp_path_factory) -> Path:
    return _save(tmp_path_factory, "grey.png", np.full((128, 128, 3), 128, dtype=np.uint8))
