"""The ``faceid`` energy: E(x) = 1 - cos(f(crop(x)), f(crop(reference))) with a face embedding f.

f is ArcFace IR-SE50 (``model_ir_se50.pth``, as FreeDoM and the paper) or facenet-pytorch's
InceptionResnetV1.  The crop box is found once, on the reference, by MTCNN and applied unchanged
(differentiably) to every clean estimate; FreeDoM's fixed CelebA-HQ crop is an option.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from zmagic_core import (BuildContext, ConfigError, Energy, FilePath, find_weights, load_image, load_strict,
                         read_state_dict)

from .faces import Box, check_box, crop_resize, detect_face, fixed_crop_256, fraction_box, square_box
from .irse import IR_SE50_UNITS, IR_SE50_WIDTHS, IRSEBackbone

ARCFACE_FILE = "model_ir_se50.pth"
ARCFACE_HOW_TO_GET = (
    "Get model_ir_se50.pth (ArcFace IR-SE50, TreB1eN/InsightFace_Pytorch) from the links in the README of "
    "TreB1eN/InsightFace_Pytorch ('IR-SE50 @ Onedrive'), of eladrich/pixel2style2pixel ('IR-SE50 Model', "
    "pretrained_models) or of vvictoryuki/FreeDoM.")
FACENET_URLS = {
    "vggface2": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
    "casia-webface": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
}
INPUT_SIZES = {"arcface": 112, "facenet": 160}


class FaceIDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: FilePath = Field(..., description="image file with the face whose identity the samples should take")
    backbone: Literal["arcface", "facenet"] = Field(
        "arcface", description="arcface: IR-SE50 (model_ir_se50.pth, as FreeDoM); facenet: InceptionResnetV1")
    weights: Optional[FilePath] = Field(None, description="state-dict file (.pth/.pt or .safetensors); default: "
                                   "looked up by its usual file name")
    pretrained: Literal["vggface2", "casia-webface"] = Field(
        "vggface2", description="facenet only, without 'weights': which facenet-pytorch checkpoint")
    download: bool = Field(True, description="facenet only: fetch the checkpoint from facenet-pytorch's releases "
                           "when it is not cached")
    crop: Literal["mtcnn", "freedom"] = Field(
        "mtcnn", description="mtcnn: the MTCNN box of the reference (or 'box'), squared and widened by 'margin'; "
                             "freedom: pool to 256, rows 35:223, columns 32:220 (FreeDoM, CelebA-HQ 256)")
    box: Optional[list[float]] = Field(None, description="crop box [x0, y0, x1, y1] as fractions of the image "
                                       "width/height, used instead of detecting one on the reference")
    margin: float = Field(0.2, ge=0, le=2, description="mtcnn crop: the square's side is (1 + 2 margin) times "
                          "the longer side of the box")
    reference_size: Optional[int] = Field(256, ge=16, le=2048, description="the reference is resized to this "
                                          "square first (as FreeDoM); null keeps its own size")
    check_face: bool = Field(True, description="fail when MTCNN finds no face in the reference, whatever the crop")
    distance: Literal["cosine", "l2"] = Field("cosine", description="1 - cosine (paper) or L2 of the "
                                              "embedding difference (FreeDoM)")
    units: list[int] = Field(list(IR_SE50_UNITS), min_length=1, max_length=6,
                             description="arcface only: units per stage (IR-SE50: 3, 4, 14, 3)")
    widths: list[int] = Field(list(IR_SE50_WIDTHS), min_length=1, max_length=6,
                              description="arcface only: channels per stage (IR-SE50: 64, 128, 256, 512)")

    _box_is_fractions = field_validator("box")(fraction_box)

    @model_validator(mode="after")
    def _options_agree(self) -> "FaceIDOptions":
        if len(self.units) != len(self.widths):
            raise ValueError("'units' and 'widths' need the same length (one entry per stage)")
        if self.crop == "freedom" and self.box is not None:
            raise ValueError("'box' needs crop: mtcnn (crop: freedom uses a fixed box)")
        return self


def build_backbone(opts: FaceIDOptions) -> nn.Module:
    """The embedding network with its weights loaded strictly (safely: no pickled code)."""
    if opts.backbone == "arcface":
        net = IRSEBackbone(opts.units, opts.widths)
        path = find_weights("ArcFace IR-SE50", ARCFACE_FILE, opts.weights, ARCFACE_HOW_TO_GET)
        load_strict(net, read_state_dict(path), path, "ArcFace IR-SE")
    else:
        from facenet_pytorch import InceptionResnetV1
        from facenet_pytorch.models.utils.download import download_url_to_file

        url = FACENET_URLS[opts.pretrained]
        net = InceptionResnetV1(pretrained=None)
        path = find_weights(
            f"facenet InceptionResnetV1 ({opts.pretrained})", url.rsplit("/", 1)[1], opts.weights,
            f"facenet-pytorch downloads it from {url} (InceptionResnetV1(pretrained={opts.pretrained!r})).",
            url=url, download=opts.download, downloader=download_url_to_file)
        # the released checkpoints carry a classifier head ('logits.*') the embedding does not use
        load_strict(net, read_state_dict(path), path, "InceptionResnetV1", ignore_prefixes=("logits.",))
    return net.eval().requires_grad_(False)


class FaceIDEnergy(Energy):
    """E = 1 - cos(f(crop(x)), f(crop(ref))) (or ||f(crop(x)) - f(crop(ref))||_2), one value per image."""

    Options = FaceIDOptions

    def __init__(self, backbone: nn.Module, reference: torch.Tensor, input_size: int,
                 box: Optional[Box] = None, distance: str = "cosine", input_scale: float = 1.0):
        super().__init__()
        self.backbone = backbone.eval()
        self.input_size, self.box, self.distance, self.input_scale = input_size, box, distance, input_scale
        with torch.no_grad():
            self.register_buffer("target", self.embed(reference.unsqueeze(0).float()))

    def train(self, mode: bool = True) -> "FaceIDEnergy":
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics stay the pretrained ones
        return self

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        if self.box is None:
            return fixed_crop_256(images, self.input_size)
        return crop_resize(images, self.box, self.input_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.crop(images) * self.input_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.embed(images.float())
        target = self.target.expand_as(emb)
        if self.distance == "l2":
            return ((emb - target).pow(2).sum(1) + 1e-12).sqrt()
        cos = (emb * target).sum(1) / (emb.norm(dim=1) * target.norm(dim=1)).clamp_min(1e-12)
        return (1.0 - cos).clamp_min(0.0)


def no_face_remedy(opts: FaceIDOptions) -> str:
    """What to change when MTCNN finds no face, given the options that made it look for one."""
    if opts.crop == "freedom" or opts.box is not None:
        return "set check_face: false (the crop does not need a detected face)"
    return "set an explicit 'box'" + (" and check_face: false" if opts.check_face else "")


def reference_box(opts: FaceIDOptions, reference: torch.Tensor) -> Optional[Box]:
    """The crop box for ``opts`` (None = FreeDoM's fixed crop); detection on the reference only."""
    detected = None
    if opts.check_face or (opts.crop == "mtcnn" and opts.box is None):
        detected, _, _ = detect_face(reference, f"reference image {opts.reference}", no_face_remedy(opts))
    if opts.crop == "freedom":
        return None
    base = check_box(opts.box) if opts.box is not None else detected
    h, w = reference.shape[-2:]
    return square_box(base, aspect=w / h, scale=1.0 + 2.0 * opts.margin)


def build_faceid(context: BuildContext, **options: Any) -> FaceIDEnergy:
    """Face identity: 1 - cosine between ArcFace (or facenet) embeddings of the reference and the sample."""
    try:
        opts = FaceIDOptions(**options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"faceid options: {problems}") from None
    reference = load_image(opts.reference, opts.reference_size)
    backbone = build_backbone(opts)  # before detection: a missing weight file is reported at once
    box = reference_box(opts, reference)
    scale = 127.5 / 128.0 if opts.backbone == "facenet" else 1.0  # facenet's fixed_image_standardization
    energy = FaceIDEnergy(backbone, reference, INPUT_SIZES[opts.backbone], box, opts.distance, scale)
    return energy.to(context.device)

