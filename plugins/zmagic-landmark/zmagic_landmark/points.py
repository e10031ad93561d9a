"""Target landmark files: JSON or .npy, K x 2 (x, y), as image fractions or in pixels."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from zmagic_core import InputError


def json_size(file: Path, data: dict, key: str) -> float:
    """``data[key]`` (the image width or height the points are pixels of) as a positive number."""
    value = data[key]
    # bool is an int to Python, but never a size
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise InputError(f"points file {file}: {key!r} must be a positive number of pixels, got {value!r:.60}")
    return float(value)


def read_points(path: str, expected: int, size: Optional[Sequence[float]] = None) -> torch.Tensor:
    """A (K, 2) float tensor of points in [0, 1] image fractions (x right, y down).

    JSON: ``[[x, y], ...]`` or ``{"points": [[x, y], ...], "width": W, "height": H}`` (then pixels).
    .npy: a (K, 2) array.  ``size`` = (width, height) says the values are pixels of an image that size.
    K must equal ``expected`` (68 for FAN, 5 for O-Net).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"points file not found: {file}")
    try:
        if file.suffix.lower() == ".npy":
            data = np.load(file, allow_pickle=False)
        else:
            data = json.loads(file.read_text())
            if isinstance(data, dict):
                if "points" not in data:
                    raise InputError(f"points file {file}: a JSON object needs a 'points' list")
                if size is None and "width" in data and "height" in data:
                    size = (json_size(file, data, "width"), json_size(file, data, "height"))
                data = data["points"]
        arr = np.asarray(data, dtype=np.float64)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read points file {file}: {type(exc).__name__}: {exc}") from None
    if arr.shape != (expected, 2):
        raise InputError(f"points file {file} holds shape {tuple(arr.shape)}; this backbone needs "
                         f"({expected}, 2): {expected} (x, y) points")
    if not np.isfinite(arr).all():
        raise InputError(f"points file {file} contains NaN or infinite values")
    if size is not None:
        width, height = (float(v) for v in size)
        if width <= 0 or height <= 0:
            raise InputError(f"points size {list(size)} must be a positive (width, height)")
        arr = arr / np.array([width, height])
    elif arr.min() < -0.5 or arr.max() > 1.5:
        raise InputError(f"points file {file} has values up to {arr.max():.1f}: these look like pixels; give "
                         "'points_size' [width, height] (or 'width'/'height' in the JSON object)")
    return torch.tensor(arr, dtype=torch.float32)
