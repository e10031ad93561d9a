"""Image files in and out: tensors in [-1, 1], shape (3, H, W); clear errors for bad files."""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from zmagic_core.contracts.errors import InputError


MAX_PIXELS = 50_000_000  # 50 megapixels: larger images (and decompression bombs) are refused unread
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # raster formats read (never EPS & co.)


def _as_rgb(im):
    """RGB 8-bit; 16- and 32-bit greyscale (I;16, I) scaled to 8 bits first (PIL's convert clips them)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        top = 65535.0 if im.mode.startswith("I;16") or peak > 255 else (1.0 if im.mode == "F" and peak <= 1 else 255.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_image(path: Union[str, Path], size: Optional[Union[int, tuple[int, int]]] = None) -> torch.Tensor:
    """An image file as RGB (3, H, W) in [-1, 1], optionally resized (bicubic) to ``size``.

    InputError (one line, naming the file) for a missing file, a folder, a file that is not an image
    in one of ``FORMATS``, a truncated or corrupt file (whatever PIL's ``LOAD_TRUNCATED_IMAGES`` says:
    a truncated image is never silently padded), and an image or a ``size`` of more than
    ``MAX_PIXELS`` (50 megapixels) pixels: the limit is checked from the header, before any pixel is
    decoded, so a decompression bomb costs nothing.
    """
    import warnings

    from PIL import Image, ImageFile, ImageOps

    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if not path.is_file():
        raise InputError(f"image {path} is not a file")
    if size is not None:
        wh = (size, size) if isinstance(size, numbers.Integral) else (size[1], size[0])
        wh = tuple(int(v) for v in wh)
        if min(wh) < 1 or wh[0] * wh[1] > MAX_PIXELS:
            raise InputError(f"cannot resize image {path} to {size}: sizes are positive and at most "
                             f"{MAX_PIXELS} pixels in all")
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never grey padding
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies
            Image.init()
            with Image.open(path, formats=[f for f in FORMATS if f in Image.OPEN]) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise InputError(f"image {path} is {w}x{h} = {w * h} pixels; at most {MAX_PIXELS} "
                                     f"({MAX_PIXELS // 1_000_000} megapixels) are read")
                im = _as_rgb(ImageOps.exif_transpose(im))  # upright, as a viewer shows it
                if size is not None:
                    im = im.resize(wh, Image.BICUBIC)
                arr = np.asarray(im, dtype=np.float32)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path} is too large: {exc}; at most {MAX_PIXELS} pixels are read") from None
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError, MemoryError...
        message = " ".join(str(exc).split()) or type(exc).__name__
        if len(message) > 300:
            message = message[:300] + "..."
        raise InputError(f"cannot read image {path}: {message}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated
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
