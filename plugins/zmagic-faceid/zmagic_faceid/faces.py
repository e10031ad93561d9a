"""Face boxes on the reference (MTCNN, real weights shipped with facenet-pytorch) and a
differentiable crop that applies such a box to a batch of generated images (zmagic-landmark uses
them too, through the package's public names: ``from zmagic_faceid import detect_face, ...``).

Boxes are kept in normalised image coordinates ``(x0, y0, x1, y1)`` in [0, 1] (fractions of the
width and height), so a box found on a 256 px reference applies to a 64 px or 512 px clean estimate.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zmagic_core import InputError

Box = tuple[float, float, float, float]
_DETECTIONS: dict = {}


@functools.lru_cache(maxsize=1)
def _mtcnn():
    from facenet_pytorch import MTCNN

    # The P/R/O-net weights ship inside facenet-pytorch; they are plain state dicts
    # (torch.load defaults to weights_only=True on the torch versions this plugin supports).
    return MTCNN(keep_all=True, select_largest=True, device="cpu").eval()


def detect_face(image: torch.Tensor, source: str = "the reference",
                remedy: str = "set an explicit 'box'") -> tuple[Box, np.ndarray, float]:
    """The largest face of a (3, H, W) image in [-1, 1]: normalised box, 5 points (pixels), probability.

    Raises InputError naming ``source`` (and suggesting ``remedy``) when MTCNN finds no face.
    """
    h, w = image.shape[-2:]
    hwc = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).contiguous()
    key = hashlib.sha1(hwc.numpy().tobytes()).hexdigest() + f"{tuple(hwc.shape)}"
    if key not in _DETECTIONS:  # the same reference is often used by several conditions and runs
        with torch.no_grad():
            _DETECTIONS[key] = _mtcnn().detect(hwc, landmarks=True)
    boxes, probs, points = _DETECTIONS[key]
    if boxes is None or len(boxes) == 0:
        raise InputError(f"no face found in {source} (MTCNN); give an image with a clearly visible face, "
                         f"or {remedy}")
    x0, y0, x1, y1 = (float(v) for v in boxes[0])
    return (x0 / w, y0 / h, x1 / w, y1 / h), np.asarray(points[0], dtype=np.float64), float(probs[0])


def square_box(box: Box, aspect: float = 1.0, scale: float = 1.0, shift_y: float = 0.0) -> Box:
    """A square (in pixels, given width/height ``aspect``) around ``box``'s centre.

    Side = ``scale`` * the box's longer side; the centre moves down by ``shift_y`` box heights.
    """
    x0, y0, x1, y1 = box
    bw, bh = (x1 - x0) * aspect, y1 - y0  # in units of the image height
    side = scale * max(bw, bh)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + shift_y * (y1 - y0)
    return (cx - side / aspect / 2, cy - side / 2, cx + side / aspect / 2, cy + side / 2)


def box_problem(box: Sequence[float], name: str = "box") -> str:
    """Why ``box`` is not a crop box ('' when it is): 4 fractions, 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1."""
    v = [float(x) for x in box]
    # NaN fails every comparison, so it is refused too
    if len(v) == 4 and 0 <= v[0] < v[2] <= 1 and 0 <= v[1] < v[3] <= 1:
        return ""
    return (f"{name} must be [x0, y0, x1, y1]: 4 fractions of the image width/height in [0, 1] (not pixels) "
            "with x0 < x1 and y0 < y1")


def fraction_box(box: Optional[Sequence[float]]) -> Optional[Sequence[float]]:
    """An options model's ``box`` validator: None, or a box :func:`box_problem` accepts (else ValueError)."""
    problem = box_problem(box) if box is not None else ""
    if problem:
        raise ValueError(problem)
    return box


def check_box(box: Sequence[float], name: str = "box") -> Box:
    """``box`` as a Box, or an InputError saying why it is none (see :func:`box_problem`)."""
    problem = box_problem(box, name)
    if problem:
        raise InputError(f"{problem}; got {list(box) if len(box) <= 8 else f'{len(box)} values'}")
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0, y0, x1, y1)


def crop_resize(images: torch.Tensor, box: Box, size: int, fill: float = -1.0) -> torch.Tensor:
    """Differentiable crop of ``box`` (normalised) from (B, C, H, W) images, resampled to size x size.

    Bilinear sampling; when the box covers many more pixels than ``size`` the image is first
    downscaled with antialiasing, so large images do not alias.  Outside the image: ``fill``
    (-1 = black in [-1, 1] images, as face-alignment pads).
    """
    b, c, h, w = images.shape
    x0, y0, x1, y1 = box
    span = max((x1 - x0) * w, (y1 - y0) * h)
    if span > 1.5 * size:
        factor = size / span
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        images = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    # affine_grid maps output [-1, 1] to input [-1, 1] (align_corners=False: pixel edges)
    sx, sy = (x1 - x0), (y1 - y0)
    tx, ty = (x0 + x1) - 1.0, (y0 + y1) - 1.0
    theta = torch.tensor([[sx, 0.0, tx], [0.0, sy, ty]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, size, size], align_corners=False)
    out = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


def fixed_crop_256(images: torch.Tensor, size: int) -> torch.Tensor:
    """FreeDoM's face-ID crop: pool to 256, take rows 35:223 and columns 32:220, pool to ``size``."""
    if images.shape[-2:] != (256, 256):
        images = F.adaptive_avg_pool2d(images, (256, 256))
    return F.adaptive_avg_pool2d(images[:, :, 35:223, 32:220], (size, size))


FREEDOM_BOX: Box = (32 / 256, 35 / 256, 220 / 256, 223 / 256)
