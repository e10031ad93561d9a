"""Image files in and out: tensors in [-1, 1], shape (3, H, W); clear errors for bad files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from zmagic_core.contracts.errors import InputError


def load_image(path: Union[str, Path], size: Optional[Union[int, tuple[int, int]]] = None) -> torch.Tensor:
    """An image file as RGB (3, H, W) in [-1, 1], optionally resized (bicubic) to ``size``."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                wh = (size, size) if isinstance(size, int) else (size[1], size[0])
                im = im.resize(wh, Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return arr.permute(1, 2, 0).numpy()


def save_image(image: torch.Tensor, path: Union[str, Path]) -> None:
    from PIL import Image

    Image.fromarray(to_uint8(image)).save(path)


def image_grid(images: torch.Tensor, columns: Optional[int] = None, pad: int = 2) -> torch.Tensor:
    """Tile (N, 3, H, W) images into one (3, H', W') image with a light border."""
    n, c, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return grid
