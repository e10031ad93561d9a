"""The ``landmark`` energy: E(x) = || P(x) - P* ||_2, the Euclidean distance between the landmark set
P(x) predicted on the clean estimate and the target P* (both as image fractions, K x 2 flattened).

P runs a landmark network on one fixed crop box, found on the reference by MTCNN (or given), and
applied differentiably to every clean estimate; the target is the same network on the reference,
or a points file.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from zmagic_core import BuildContext, ConfigError, Energy, FilePath, InputError, load_image
from zmagic_faceid import Box, check_box, crop_resize, detect_face, fraction_box, square_box

from .networks import FANLandmarks, ONetLandmarks
from .points import read_points

FAN_REFERENCE_SCALE = 195.0  # face-alignment: crop side = 200 * (w + h) / 195, centre 0.12 h up
FAN_CENTER_SHIFT = -0.12
POINTS_TO_BOX = {"onet": 2.5, "fan": 1.0}  # face box side / side of the points' bounding box


class LandmarkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: Optional[FilePath] = Field(None, description="image whose face's landmarks are the target")
    points: Optional[FilePath] = Field(None, description="target points file (JSON or .npy), K x 2: 5 for onet, "
                                  "68 for fan; image fractions unless points_size is given")
    points_size: Optional[list[float]] = Field(None, min_length=2, max_length=2,
                                               description="[width, height]: the points are pixels of that image")
    backbone: Literal["onet", "fan"] = Field("onet", description="onet: MTCNN O-Net, 5 points, weights ship with "
                                             "facenet-pytorch; fan: face-alignment 2DFAN-4, 68 points")
    weights: Optional[FilePath] = Field(None, description="state-dict file; default: facenet-pytorch's onet.pt, or "
                                   "face-alignment's cached 2DFAN4-11f355bf06.pth.tar")
    download: bool = Field(True, description="fan only: fetch 2DFAN-4 from face-alignment's URL when not cached")
    box: Optional[list[float]] = Field(None, description="face box [x0, y0, x1, y1] as image fractions, used "
                                       "instead of detecting one on the reference; the network's crop is derived "
                                       "from it as from an MTCNN box")
    reference_size: Optional[int] = Field(256, ge=16, le=2048, description="the reference is resized to this "
                                          "square first; null keeps its own size")
    fan_modules: int = Field(4, ge=1, le=4, description="fan only: hourglass modules (2DFAN-4 has 4)")
    temperature: float = Field(0.05, gt=0, description="fan only: softmax temperature of the soft-argmax")
    fan_input_size: int = Field(256, ge=64, le=512, multiple_of=16,
                                description="fan only: crop size fed to FAN (trained at 256; smaller for tests)")

    _box_is_fractions = field_validator("box")(fraction_box)

    @field_validator("points_size")
    @classmethod
    def _size_is_positive(cls, size: Optional[list[float]]) -> Optional[list[float]]:
        if size is not None and not all(math.isfinite(v) and v > 0 for v in size):
            raise ValueError("points_size must be [width, height] in pixels, both > 0")
        return size

    @model_validator(mode="after")
    def _one_target(self) -> "LandmarkOptions":
        if (self.reference is None) == (self.points is None):
            raise ValueError("landmark needs exactly one of 'reference' (an image) or 'points' (a points file)")
        return self


class LandmarkEnergy(Energy):
    """E = ||P(crop(x)) - P*||_2 over all K points (image-fraction coordinates), one value per image."""

    Options = LandmarkOptions

    def __init__(self, net: nn.Module, box: Box, target: torch.Tensor):
        super().__init__()
        self.net, self.box = net.eval(), box
        self.register_buffer("target", target.float())

    def train(self, mode: bool = True) -> "LandmarkEnergy":
        super().train(mode)
        self.net.eval()
        return self

    def points(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, 2) landmarks of each image, as fractions of its width and height."""
        x0, y0, x1, y1 = self.box
        uv = self.net(crop_resize(images.float(), self.box, self.net.input_size))
        origin = uv.new_tensor([x0, y0])
        return origin + uv * uv.new_tensor([x1 - x0, y1 - y0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        diff = self.points(images) - self.target
        return (diff.pow(2).flatten(1).sum(1) + 1e-12).sqrt()


def network_box(backbone: str, face: Box, width: int, height: int) -> Box:
    """The crop each network expects around a face box: MTCNN's square for O-Net (``rerec``),
    face-alignment's enlarged square shifted up for FAN."""
    aspect = width / height
    if backbone == "onet":
        return square_box(face, aspect=aspect)
    fw, fh = (face[2] - face[0]) * width, (face[3] - face[1]) * height
    side = 200.0 * (fw + fh) / FAN_REFERENCE_SCALE
    return square_box(face, aspect=aspect, scale=side / max(fw, fh), shift_y=FAN_CENTER_SHIFT)


def box_from_points(backbone: str, points: torch.Tensor, source: str = "the points") -> Box:
    """A face box guessed from target points (no reference): a square around their bounding box."""
    (x0, y0), (x1, y1) = points.min(0).values.tolist(), points.max(0).values.tolist()
    if x1 <= x0 and y1 <= y0:  # a zero-size crop would make the energy zero: guidance silently off
        raise InputError(f"{source}: the points span no area (all equal), so no face box can be guessed from "
                         "them; give distinct points or an explicit 'box'")
    return square_box((x0, y0, x1, y1), scale=POINTS_TO_BOX[backbone])


def build_net(opts: LandmarkOptions) -> nn.Module:
    if opts.backbone == "onet":
        return ONetLandmarks(opts.weights)
    return FANLandmarks(opts.weights, opts.fan_modules, opts.temperature, opts.download, opts.fan_input_size)


def build_landmark(context: BuildContext, **options: Any) -> LandmarkEnergy:
    """Facial landmarks: distance between the sample's and the target's landmark sets."""
    try:
        opts = LandmarkOptions(**options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"landmark options: {problems}") from None
    count = ONetLandmarks.num_points if opts.backbone == "onet" else FANLandmarks.num_points
    reference, target = None, None
    if opts.reference is not None:
        reference = load_image(opts.reference, opts.reference_size)
    else:
        target = read_points(opts.points, count, opts.points_size)
    face = check_box(opts.box) if opts.box is not None else None
    net = build_net(opts)  # before detection: a missing weight file is reported at once
    if reference is not None:
        height, width = reference.shape[-2:]
        if face is None:
            face, _, _ = detect_face(reference, source=f"reference image {opts.reference}")
    else:
        height = width = 1  # boxes from points are squares in image fractions (square images)
        face = face if face is not None else box_from_points(opts.backbone, target, f"points file {opts.points}")
    box = network_box(opts.backbone, face, width, height)
    if target is None:
        with torch.no_grad():
            target = LandmarkEnergy(net, box, torch.zeros(count, 2)).points(reference.unsqueeze(0))[0]
    return LandmarkEnergy(net, box, target).to(context.device)

