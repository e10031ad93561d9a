"""The ``style`` energy: Frobenius distance between Gram matrices of image and reference features.

METHOD.md section 2 (style condition): FreeDoM takes CLIP ViT-B/16 patch tokens after block 2
(image resized to 224), G = F^T F, and the plain L2 norm of G(image) - G(reference).  The VGG19
backbone follows Gatys et al. (relu1_1 ... relu5_1), summing the per-layer norms.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from zmagic_clip import DEFAULT_PRETRAINED, load_open_clip, model_config_problem
from zmagic_core import BuildContext, ConfigError, Energy, FilePath, PathOrName, load_image, read_state_dict

from .backbones import (GATYS_LAYERS, ClipTokens, VggFeatures, vgg19_layer_names, vgg19_min_size,
                        vgg19_weights_file)

CLIP_ONLY = ("model", "pretrained", "checkpoint", "model_config_path", "quick_gelu", "block", "attention")
VGG_ONLY = ("weights", "image_size", "layers")


class StyleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    reference: FilePath = Field(..., min_length=1, description="style reference image file")
    backbone: Literal["clip", "vgg"] = Field("clip", description="clip: CLIP ViT tokens after a block "
                                                                 "(FreeDoM); vgg: VGG19 ReLU layers (Gatys)")
    gram: Optional[Literal["sum", "mean"]] = Field(
        None, description="G = F F^T summed over positions ('sum', FreeDoM) or averaged ('mean'); "
                          "default: sum for clip, mean for vgg")
    download: bool = Field(True, description="download missing weights (never when HF_HUB_OFFLINE=1)")
    cache_dir: Optional[str] = Field(None, description="weights cache: Hugging Face cache (clip) or the "
                                                       "folder holding vgg19-dcbb9e9d.pth (vgg)")
    # clip backbone
    model: Optional[str] = Field(None, description="open_clip model (default ViT-B-16)")
    pretrained: Optional[PathOrName] = Field(None, description=f"open_clip pretrained tag or a local weights "
                                                               f"file (default {DEFAULT_PRETRAINED})")
    checkpoint: Optional[FilePath] = Field(None, description="local CLIP weights file (.safetensors / state dict)")
    model_config_path: Optional[FilePath] = Field(None, alias="model_config",
                                             description="JSON file with a custom open_clip model config")
    quick_gelu: Optional[bool] = None
    block: Optional[int] = Field(None, ge=0, description="0-based ViT block whose output is used (default 2)")
    attention: Optional[Literal["math", "auto"]] = Field(
        None, description="math (default): twice-differentiable attention; auto: fastest kernel")
    # vgg backbone
    weights: Optional[FilePath] = Field(None, description="local VGG19 state dict (default: torchvision IMAGENET1K_V1)")
    image_size: Optional[int] = Field(None, ge=16, le=2048, description="side the images are resized to (default 224)")
    layers: Optional[list[str]] = Field(None, min_length=1, description=f"VGG19 layers (default {list(GATYS_LAYERS)})")

    @model_validator(mode="after")
    def _options_fit_backbone(self):
        wrong = VGG_ONLY if self.backbone == "clip" else CLIP_ONLY
        given = [n if n != "model_config_path" else "model_config" for n in wrong if getattr(self, n) is not None]
        if given:
            raise ValueError(f"options {given} do not apply to backbone {self.backbone!r}")
        problem = model_config_problem(self.model_config_path, self.model) if self.backbone == "clip" else None
        if problem:
            raise ValueError(problem)
        if self.backbone == "vgg":
            size = self.image_size or 224
            deepest = max(self.layers or GATYS_LAYERS, key=vgg19_min_size)
            if size < vgg19_min_size(deepest):
                raise ValueError(f"image_size: {size} is too small for layer {deepest}, which needs at least "
                                 f"{vgg19_min_size(deepest)} (each pool halves the side)")
        return self

    @field_validator("layers")
    @classmethod
    def _known_layers(cls, layers):
        unknown = [n for n in layers or () if n not in vgg19_layer_names()]
        if unknown:
            raise ValueError(f"unknown VGG19 layers {unknown}; choose from {', '.join(vgg19_layer_names())}")
        return layers


def gram_matrix(feats: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, N) -> (B, C, C): F F^T, divided by N for 'mean'."""
    g = feats @ feats.transpose(1, 2)
    return g / feats.shape[-1] if mode == "mean" else g


class StyleEnergy(Energy):
    """E(x) = sum over layers of ||G_l(x) - G_l(reference)||_F."""

    Options = StyleOptions

    def __init__(self, backbone: nn.Module, reference: torch.Tensor, gram: str = "sum"):
        super().__init__()
        if gram not in ("sum", "mean"):
            raise ConfigError(f"style gram must be 'sum' or 'mean', got {gram!r}")
        self.backbone, self.gram = backbone, gram
        if reference.ndim == 3:
            reference = reference.unsqueeze(0)
        with torch.no_grad():
            targets = [gram_matrix(f, gram) for f in backbone(reference)]
        self.num_layers = len(targets)
        for i, t in enumerate(targets):
            self.register_buffer(f"target{i}", t.detach())

    def train(self, mode: bool = True) -> "StyleEnergy":
        """A frozen network: always in eval mode, whatever the caller asks."""
        return super().train(False)

    def targets(self) -> list[torch.Tensor]:
        return [getattr(self, f"target{i}") for i in range(self.num_layers)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = images.new_zeros(images.shape[0], dtype=torch.float32)
        for f, t in zip(self.backbone(images), self.targets()):
            total = total + (gram_matrix(f, self.gram) - t).flatten(1).norm(dim=1)
        return total


def build_style(context: BuildContext, **options: Any) -> StyleEnergy:
    """Gram-matrix style guidance towards a reference image (CLIP ViT block-2 tokens or VGG19)."""
    try:
        opts = StyleOptions.model_validate(options)
    except ValidationError as exc:  # one line: field: message; ...
        raise ConfigError("style options: " + "; ".join(
            ": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in exc.errors())) from None
    reference = load_image(opts.reference)  # InputError for a missing or unreadable file, before any model
    if opts.backbone == "clip":
        loaded = load_open_clip(model=opts.model, pretrained=opts.pretrained or DEFAULT_PRETRAINED,
                                checkpoint=opts.checkpoint, model_config=opts.model_config_path,
                                quick_gelu=opts.quick_gelu, download=opts.download, cache_dir=opts.cache_dir,
                                device="cpu", what="style")
        backbone: nn.Module = ClipTokens(loaded, block=2 if opts.block is None else opts.block,
                                         attention=opts.attention or "math")
        gram = opts.gram or "sum"
    else:
        path = vgg19_weights_file(opts.weights, opts.cache_dir, opts.download)
        backbone = VggFeatures(read_state_dict(path, "style: VGG19"), layers=opts.layers or GATYS_LAYERS,
                               image_size=opts.image_size or 224, source=str(path))
        gram = opts.gram or "mean"
    backbone = backbone.to(context.device)
    return StyleEnergy(backbone, reference.to(context.device), gram).to(context.device)

