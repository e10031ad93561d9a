"""The ``parsing`` energy: distance between the face parsing of the image and of a reference.

E(x) = || P(x) - P(ref) ||_2  (FreeDoM; P = per-pixel class logits or softmax probabilities),
or the mean squared difference (the Z-Magic paper's "MSE").  Images (B, 3, H, W) in [-1, 1] are
resized (differentiably) to ``input_size``, mapped to [0, 1] and ImageNet-normalised, the
preprocessing of the face-parsing demo.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from zmagic_core import (BuildContext, ConfigError, Energy, FilePath, InputError, PathOrName,
                         WeightsNotFoundError, find_weights, hub_offline, load_image, unreachable)

from .bisenet import IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, load_bisenet

BISENET_FILE = "79999_iter.pth"
# other names the same checkpoint is kept under, tried in every weights folder after BISENET_FILE
BISENET_ALTERNATIVES = ("face-parsing/79999_iter.pth", "79999_iter.safetensors")
BISENET_URL = "https://drive.google.com/open?id=154JgKpzCPW82qINcVieuPH3fZ2e0P812"
BISENET_REPO = "https://github.com/zllrunning/face-parsing.PyTorch"
BISENET_HOW_TO_GET = (f"Download {BISENET_FILE} (BiSeNet face parsing, {BISENET_REPO}, 'our pre-trained model') "
                      f"from {BISENET_URL}; it is not downloaded automatically.")
SEGFORMER_DEFAULT = "jonathandinu/face-parsing"
WEIGHTS_ENV = "ZMAGIC_PARSING_WEIGHTS"  # a BiSeNet checkpoint file, used when the 'weights' option is not given


class ParsingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: FilePath = Field(..., description="image file whose face parsing the samples should match")
    backbone: Literal["bisenet", "segformer"] = Field(
        "bisenet", description="bisenet: zllrunning 79999_iter.pth; segformer: a transformers SegFormer")
    weights: Optional[PathOrName] = Field(
        None, description="bisenet: path to 79999_iter.pth (.pth or .safetensors); segformer: a Hugging Face "
                          f"model id or a save_pretrained folder (default {SEGFORMER_DEFAULT!r})")
    input_size: int = Field(512, ge=16, le=4096, description="side the image is resized to before parsing")
    distance: Literal["logits", "probabilities"] = Field(
        "logits", description="compare raw logits (FreeDoM) or per-pixel softmax probabilities")
    reduction: Literal["l2", "mse"] = Field(
        "l2", description="l2: plain L2 norm of the difference (FreeDoM); mse: mean squared difference")

    @model_validator(mode="after")
    def _weights_fit_backbone(self):
        # zmagic check resolves weights before validating, so a file found here is the one the build would get
        if self.backbone == "segformer" and self.weights and Path(self.weights).expanduser().is_file():
            raise ValueError(f"weights: the segformer backbone needs a Hugging Face model id or a save_pretrained "
                             f"folder, not a file: {self.weights}")
        return self


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable bilinear resize to (size, size); antialiased when shrinking."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    shrink = images.shape[-2] > size or images.shape[-1] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class ParsingEnergy(Energy):
    """E = distance(parse(x), parse(reference)) per sample; the parser is frozen.

    ``parser`` maps ImageNet-normalised (B, 3, S, S) images to (B, C, h, w) logits;
    ``reference`` is a (3, H, W) or (1, 3, H, W) image in [-1, 1].
    """

    def __init__(self, parser: nn.Module, reference: torch.Tensor, input_size: int = 512,
                 distance: str = "logits", reduction: str = "l2"):
        super().__init__()
        if distance not in ("logits", "probabilities"):
            raise ConfigError(f"parsing distance must be 'logits' or 'probabilities', got {distance!r}")
        if reduction not in ("l2", "mse"):
            raise ConfigError(f"parsing reduction must be 'l2' or 'mse', got {reduction!r}")
        self.parser = parser.eval().requires_grad_(False)
        self.input_size, self.distance, self.reduction = int(input_size), distance, reduction
        device = next(iter(parser.parameters()), torch.empty(0)).device  # the reference is parsed there
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
        if reference.dim() == 3:
            reference = reference.unsqueeze(0)
        if reference.dim() != 4 or reference.shape[:2] != (1, 3):
            raise InputError(f"parsing reference must be one RGB image, got shape {tuple(reference.shape)}")
        with torch.no_grad():
            target = self.parse(reference.to(self.mean))
        self.register_buffer("target", target)

    def parse(self, images: torch.Tensor) -> torch.Tensor:
        """Parsing output (logits or probabilities) of images in [-1, 1]."""
        x = resize(images.to(self.mean.dtype), self.input_size)
        x = ((x + 1) / 2 - self.mean) / self.std
        out = self.parser(x)
        return out.softmax(dim=1) if self.distance == "probabilities" else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        diff = (self.parse(images) - self.target).flatten(1)
        if self.reduction == "mse":
            return diff.pow(2).mean(dim=1)
        return diff.norm(dim=1)


class BiSeNetParser(nn.Module):
    """The BiSeNet main output (logits at the input resolution)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.logits(x)


class SegformerParser(nn.Module):
    """A transformers SegFormer; logits at a quarter of the input resolution."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def bisenet_weights(weights: Optional[str]) -> Path:
    """The BiSeNet checkpoint: the ``weights`` option, else ``$ZMAGIC_PARSING_WEIGHTS`` (both used as
    given), else ``79999_iter.pth`` (or an alternative name) found by the core's search
    (``$ZMAGIC_WEIGHTS_DIR``, ``~/.cache/zmagic/weights``, the torch hub checkpoint folder)."""
    how_to_get = BISENET_HOW_TO_GET
    if weights is None and os.environ.get(WEIGHTS_ENV):
        weights = os.environ[WEIGHTS_ENV]
        how_to_get = f"(${WEIGHTS_ENV} names this file: fix or unset it.) {how_to_get}"
    elif weights is None:
        how_to_get = f"{how_to_get} ${WEIGHTS_ENV} may also name the file."
    return find_weights("BiSeNet face-parsing", BISENET_FILE, weights, how_to_get, alternatives=BISENET_ALTERNATIVES)


def build_bisenet_parser(weights: Optional[str]) -> nn.Module:
    path = bisenet_weights(weights)
    return BiSeNetParser(load_bisenet(path, NUM_CLASSES))


def build_segformer_parser(weights: Optional[str]) -> nn.Module:
    try:
        from transformers import SegformerForSemanticSegmentation
    except ImportError:
        raise ConfigError("the segformer backend needs transformers: pip install 'zmagic-parsing[segformer]'") from None
    name = weights or SEGFORMER_DEFAULT
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise InputError(f"SegFormer checkpoint must be a model id or a save_pretrained folder, not a file: {local}")

    def load(**kwargs):
        # Eager attention: SDPA kernels on the CPU have no double backward, which guidance may need.
        return SegformerForSemanticSegmentation.from_pretrained(str(local) if local.is_dir() else name,
                                                                attn_implementation="eager", **kwargs)

    try:
        if local.is_dir():
            model = load()
        else:
            try:
                model = load(local_files_only=True)  # the cache first: no network when the model is there
            except (OSError, ValueError):
                # the hub client retries for ~30 s on an offline machine: fail at once instead
                why = ("offline mode is on (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or DIFFUSERS_OFFLINE)"
                       if hub_offline() else unreachable())
                if why:
                    raise WeightsNotFoundError(
                        f"SegFormer face parser {name!r} is not in the Hugging Face cache and cannot be downloaded: "
                        f"{why}; on a machine with network run `hf download {name} --local-dir segformer-face` "
                        f"and pass that folder as 'weights'") from None
                model = load()
    except (OSError, ValueError) as exc:
        where = "the folder" if local.is_dir() else "the Hugging Face cache or hub (HF_HOME, HF_HUB_OFFLINE)"
        raise WeightsNotFoundError(
            f"cannot load SegFormer face parser {name!r} from {where}: {str(exc).splitlines()[0] if str(exc) else exc}; "
            f"download it with `hf download {SEGFORMER_DEFAULT}` (or save_pretrained a folder) "
            f"and pass the id or folder as 'weights'") from None
    return SegformerParser(model.eval())


def build_parsing(context: BuildContext, **options: Any) -> ParsingEnergy:
    """Face parsing distance to a reference image (BiSeNet 79999_iter.pth or SegFormer)."""
    try:
        opts = ParsingOptions(**options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"parsing options: {problems} (accepts: {', '.join(ParsingOptions.model_fields)})") from None
    try:
        reference = load_image(opts.reference)
    except InputError as exc:
        raise InputError(f"parsing reference: {exc}") from None
    if opts.backbone == "bisenet":
        parser = build_bisenet_parser(opts.weights)
    else:
        parser = build_segformer_parser(opts.weights)
    parser = parser.to(device=context.device, dtype=torch.float32)
    return ParsingEnergy(parser, reference, opts.input_size, opts.distance, opts.reduction)

