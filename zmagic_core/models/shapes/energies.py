"""The shapes world's "pretrained networks": energies on the clean estimate, each mirroring a
real condition (attribute classifier ~ CLIP text, mask ~ face parsing, keypoints ~ landmarks,
Gram matrices ~ style).  Each also gives its exact likelihood per prototype, log p(c | k), the
ground truth the evaluation and the oracle use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from zmagic_core.contracts.components import BuildContext, Energy
from zmagic_core.contracts.errors import ConfigError, InputError
from zmagic_core.contracts.options import PathOrName
from zmagic_core.files.images import load_image
from zmagic_core.models.shapes.world import (ATTRIBUTES, BACKGROUND, COLORS, POSITIONS, SHAPES, ShapesModel,
                                             per_sample_matmul, render)

Reference = Union[PathOrName, dict[str, str]]  # a prototype ('red circle center' or its fields) or an image file


def _world(context: BuildContext) -> ShapesModel:
    if not isinstance(context.model, ShapesModel):
        raise ConfigError("shapes-* energies need the 'shapes' or 'shapes-flow' base model")
    return context.model


def reference_image(spec: Reference, size: int) -> torch.Tensor:
    """A reference from attributes ({shape, color, position} or "red circle center") or a file."""
    if isinstance(spec, str):
        words = spec.split()
        looks_like_path = any(spec.lower().endswith(e) for e in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
        if looks_like_path or "/" in spec or Path(spec).exists():
            return load_image(spec, size)
        spec = {}
        for w in words:
            key = "shape" if w in SHAPES else "color" if w in COLORS else "position" if w in POSITIONS else None
            if key is None:
                raise InputError(f"reference word {w!r} is not a shape {SHAPES}, color {tuple(COLORS)} "
                                 f"or position {POSITIONS}, and no such image file exists")
            spec[key] = w
    missing = [a for a in ATTRIBUTES if a not in spec]
    if missing:
        raise InputError(f"reference {spec} lacks {missing}; give shape, color and position")
    try:
        return render(spec["shape"], spec["color"], spec["position"], size)
    except ValueError as exc:
        raise InputError(f"bad reference {spec}: {exc}") from None


class ShapesEnergy(Energy):
    """Common part: ground-truth likelihood per prototype from the energy at the prototypes."""

    temperature: float = 1.0

    def log_likelihood(self, world: ShapesModel) -> torch.Tensor:
        """log p(c | k) for every prototype: -E(mu_k) / T, shifted so the best is 0."""
        with torch.no_grad():
            e = self(world.mu.view(-1, *world.sample_shape))
        return -(e - e.min()) / self.temperature


class AttributeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attribute: Literal["shape", "color", "position"]
    value: str
    tau: float = Field(4.0, gt=0, description="smoothing width of the clean classifier (pixels-norm units)")


class AttributeEnergy(ShapesEnergy):
    """E = -log p_tau(a | x0), the mixture posterior of the clean prototypes at width tau."""

    Options = AttributeOptions

    def __init__(self, world: ShapesModel, attribute: str, value: str, tau: float = 4.0):
        super().__init__()
        try:
            mask = world.attribute_mask(attribute, value)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.attribute, self.value, self.tau = attribute, value, tau
        self.register_buffer("mu", world.mu)
        self.register_buffer("mu_sq", world.mu_sq)
        self.register_buffer("mask", mask)

    def forward(self, images):
        flat = images.flatten(1)
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * per_sample_matmul(flat, self.mu.T) + self.mu_sq
        logits = -d2 / (2 * self.tau**2)
        return torch.logsumexp(logits, 1) - torch.logsumexp(logits[:, self.mask], 1)

    def log_likelihood(self, world):
        return torch.where(self.mask, 0.0, float("-inf"))


def soft_mask(images: torch.Tensor, threshold: float = 1.5, softness: float = 0.3) -> torch.Tensor:
    """Per-pixel foreground probability: squared distance to the background colour, squashed."""
    bg = torch.tensor(BACKGROUND, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    d2 = (images - bg).pow(2).sum(1)
    return torch.sigmoid((d2 - threshold) / softness)


class MaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: Reference = Field(..., description="'red circle center', {shape, color, position} or an image path")
    softness: float = Field(0.3, gt=0)
    temperature: float = Field(1.0, gt=0, description="T of the ground truth p(c|k) = exp(-E(mu_k)/T)")


class MaskEnergy(ShapesEnergy):
    """E = ||mask(x0) - mask(reference)||_2 (plain L2, as FreeDoM's parsing energy)."""

    Options = MaskOptions

    def __init__(self, world: ShapesModel, reference: Reference, softness: float = 0.3, temperature: float = 1.0):
        super().__init__()
        self.softness, self.temperature = softness, temperature
        ref = reference_image(reference, world.size).unsqueeze(0).to(world.mu)
        self.register_buffer("target", soft_mask(ref, softness=softness))

    def forward(self, images):
        return (soft_mask(images, softness=self.softness) - self.target).flatten(1).norm(dim=1)


def mask_centroid(mask: torch.Tensor) -> torch.Tensor:
    """Soft centroid (x, y) in [0, 1] image coordinates of a (B, H, W) mask."""
    h, w = mask.shape[-2:]
    ys = (torch.arange(h, device=mask.device, dtype=mask.dtype) + 0.5) / h
    xs = (torch.arange(w, device=mask.device, dtype=mask.dtype) + 0.5) / w
    total = mask.sum((1, 2)).clamp_min(1e-6)
    return torch.stack([(mask.sum(1) * xs).sum(1) / total, (mask.sum(2) * ys).sum(1) / total], dim=1)


class KeypointOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: Optional[Reference] = Field(None, description="image whose mask centroid is the target")
    points: Optional[list[list[float]]] = Field(None, description="target [[x, y]] in [0, 1] coordinates")
    softness: float = Field(0.3, gt=0)
    temperature: float = Field(0.05, gt=0)


class KeypointEnergy(ShapesEnergy):
    """E = ||centroid(mask(x0)) - target||_2, the landmark analog (one keypoint: the centroid)."""

    Options = KeypointOptions

    def __init__(self, world: ShapesModel, reference: Optional[Reference] = None,
                 points: Optional[list[list[float]]] = None, softness: float = 0.3, temperature: float = 0.05):
        super().__init__()
        if (reference is None) == (points is None):
            raise ConfigError("shapes-keypoints needs exactly one of 'reference' or 'points'")
        self.softness, self.temperature = softness, temperature
        if points is not None:
            target = torch.tensor(points, dtype=torch.float32)
            if target.shape != (1, 2):
                raise InputError(f"shapes-keypoints points must have shape (1, 2), got {tuple(target.shape)}")
        else:
            ref = reference_image(reference, world.size).unsqueeze(0)
            target = mask_centroid(soft_mask(ref, softness=softness))
        self.register_buffer("target", target.to(world.mu))

    def forward(self, images):
        return (mask_centroid(soft_mask(images, softness=self.softness)) - self.target).norm(dim=1)


class StyleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: Reference
    features: Literal["color", "random-conv"] = "color"
    temperature: float = Field(0.1, gt=0)


class StyleEnergy(ShapesEnergy):
    """E = ||Gram(features(x0)) - Gram(features(reference))||_F, with position-free statistics."""

    Options = StyleOptions

    def __init__(self, world: ShapesModel, reference: Reference, features: str = "color", temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature
        self.conv: Optional[nn.Conv2d] = None
        if features == "random-conv":  # a fixed random filter bank, seeded so every run sees the same one
            gen = torch.Generator().manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            with torch.no_grad():
                self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) / 5.0)
            self.conv.requires_grad_(False)
        ref = reference_image(reference, world.size).unsqueeze(0).to(world.mu)
        self.register_buffer("target", self.gram(ref))

    def gram(self, images):
        feats = images if self.conv is None else torch.tanh(self.conv(images))
        f = feats.flatten(2)
        # products summed over pixels, not a batched matmul: bmm's kernel (hence the bits) can change with
        # the batch, under vmap and double backward too, and a sample must not depend on its batch
        return (f[:, :, None, :] * f[:, None, :, :]).sum(-1) / f.shape[-1]

    def forward(self, images):
        return (self.gram(images) - self.target).flatten(1).norm(dim=1)


def _factory(cls):
    def build(context: BuildContext, **options: Any):
        return cls(_world(context), **options).to(context.device)

    build.__doc__ = cls.__doc__
    return build


# kind -> energy class; each class carries its options model as ``Options``
ENERGIES = {
    "shapes-attribute": AttributeEnergy,
    "shapes-mask": MaskEnergy,
    "shapes-keypoints": KeypointEnergy,
    "shapes-style": StyleEnergy,
}
FACTORIES = {name: _factory(cls) for name, cls in ENERGIES.items()}
