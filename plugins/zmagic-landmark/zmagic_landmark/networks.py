"""Landmark networks as differentiable maps: face crop (B, 3, S, S) in [-1, 1] -> (B, K, 2) points
in crop coordinates ((0, 0) = top-left corner, (1, 1) = bottom-right corner of the crop).

- ``ONetLandmarks``: MTCNN's O-Net (facenet-pytorch, real weights shipped in the package), 48 px,
  5 points (eyes, nose, mouth corners) from its landmark head.
- ``FANLandmarks``: face-alignment's FAN (``FAN(4)`` = 2DFAN-4), 256 px, 68 points, read from the
  last heatmap stack (64 x 64) with a soft-argmax so the points are differentiable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from zmagic_core import find_weights, load_strict, read_state_dict

FAN_URL = "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar"
FAN_FILE = FAN_URL.rsplit("/", 1)[1]
FAN_HOW_TO_GET = (f"face-alignment (1adrianb/face-alignment) downloads 2DFAN-4 from {FAN_URL} "
                  "(FaceAlignment(LandmarksType.TWO_D) does it on first use).")


def fetch_fan(url: str, target: str) -> None:
    """face-alignment's download into the folder of ``target`` (find_weights' downloader signature)."""
    from face_alignment.utils import load_file_from_url

    load_file_from_url(url, model_dir=str(Path(target).parent))


def onet_weights_path() -> Path:
    import facenet_pytorch

    return Path(facenet_pytorch.__file__).parent / "data" / "onet.pt"


class ONetLandmarks(nn.Module):
    """The 5-point landmark head of MTCNN's O-Net, run on a 48 x 48 crop.

    O-Net's input is (pixel - 127.5) / 128; its landmark output is 5 x-fractions then 5
    y-fractions of the crop box (facenet-pytorch's detect_face maps them to pixels the same way).
    """

    input_size = 48
    num_points = 5

    def __init__(self, weights: Optional[str] = None):
        super().__init__()
        from facenet_pytorch.models.mtcnn import ONet

        self.net = ONet(pretrained=False)
        path = Path(weights).expanduser() if weights else onet_weights_path()
        path = find_weights("MTCNN O-Net", path.name, str(path),
                            "It ships inside facenet-pytorch (facenet_pytorch/data/onet.pt); reinstall "
                            "facenet-pytorch==2.5.3.")
        load_strict(self.net, read_state_dict(path), path, "MTCNN O-Net")
        self.net.eval().requires_grad_(False)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        _, landmarks, _ = self.net(crops * (127.5 / 128.0))
        return torch.stack([landmarks[:, :5], landmarks[:, 5:]], dim=-1)


def soft_argmax(heatmaps: torch.Tensor, temperature: float) -> torch.Tensor:
    """Expected (x, y) under softmax(heatmap / temperature), in [0, 1] heatmap coordinates.

    Cell (i, j) of an h x w map covers [j/w, (j+1)/w] x [i/h, (i+1)/h]; its centre is the point used.
    """
    b, k, h, w = heatmaps.shape
    p = torch.softmax(heatmaps.float().flatten(2) / temperature, dim=-1).view(b, k, h, w)
    xs = (torch.arange(w, device=heatmaps.device, dtype=p.dtype) + 0.5) / w
    ys = (torch.arange(h, device=heatmaps.device, dtype=p.dtype) + 0.5) / h
    return torch.stack([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], dim=-1)


class FANLandmarks(nn.Module):
    """face-alignment's FAN on a 256 x 256 crop (input in [0, 1]), 68 points by soft-argmax."""

    input_size = 256
    num_points = 68

    def __init__(self, weights: Optional[str] = None, modules: int = 4, temperature: float = 0.05,
                 download: bool = True, input_size: int = 256):
        super().__init__()
        from face_alignment.models.fan import FAN

        self.temperature, self.input_size = temperature, input_size  # FAN is convolutional: 256 is its training size
        self.net = FAN(modules)
        path = find_weights("face-alignment 2DFAN-4", FAN_FILE, weights, FAN_HOW_TO_GET,
                            url=FAN_URL, download=download, downloader=fetch_fan)
        load_strict(self.net, read_state_dict(path), path, f"face-alignment FAN({modules})")
        self.net.eval().requires_grad_(False)

    def heatmaps(self, crops: torch.Tensor) -> torch.Tensor:
        out = self.net((crops + 1.0) / 2.0)
        return out[-1] if isinstance(out, (list, tuple)) else out

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return soft_argmax(self.heatmaps(crops), self.temperature)
