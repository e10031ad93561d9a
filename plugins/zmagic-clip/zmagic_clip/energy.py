"""The ``clip-text`` energy: distance between a prompt's and the image's CLIP embeddings.

METHOD.md section 2 (text condition): CLIP ViT-B/16, the image resized (bicubic) to 224 and
CLIP-normalised; the paper uses the cosine distance, FreeDoM the L2 norm of the unnormalised
difference of the embeddings.
"""
from __future__ import annotations

import contextlib
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from zmagic_core import BuildContext, ConfigError, Energy, FilePath, PathOrName

from .loading import DEFAULT_PRETRAINED, LoadedClip, load_open_clip, model_config_problem


class ClipPreprocess(nn.Module):
    """Images in [-1, 1] -> bicubic resize to the model's size -> CLIP normalisation (differentiable)."""

    def __init__(self, size: int, mean, std):
        super().__init__()
        self.size = int(size)
        # normalise x in [-1, 1] directly: ((x + 1) / 2 - mean) / std = (x - (2 mean - 1)) / (2 std)
        self.register_buffer("shift", (2 * torch.tensor(mean, dtype=torch.float32) - 1).view(1, 3, 1, 1))
        self.register_buffer("scale", (2 * torch.tensor(std, dtype=torch.float32)).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return (images - self.shift) / self.scale


def attention_context(mode: str):
    """The math SDPA kernel is twice differentiable (the fused CPU/GPU kernels are not)."""
    if mode != "math":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class ClipTextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    prompt: str = Field(..., min_length=1, description="the text the image should match")
    distance: Literal["cosine", "l2"] = Field(
        "cosine", description="cosine: 1 - cos(image, text) of the embeddings (the paper); "
                              "l2: ||text - image|| of the unnormalised embeddings (FreeDoM)")
    model: Optional[str] = Field(None, description="open_clip model name (default ViT-B-16, or the name "
                                                   "model_config registers)")
    pretrained: Optional[PathOrName] = Field(DEFAULT_PRETRAINED, description="open_clip pretrained tag, or a local "
                                             "weights file; with checkpoint it only names which weights the file "
                                             "holds (preprocessing, QuickGELU)")
    checkpoint: Optional[FilePath] = Field(None, description="local weights file (.safetensors / torch state dict)")
    model_config_path: Optional[FilePath] = Field(None, alias="model_config",
                                             description="JSON file with a custom open_clip model config")
    quick_gelu: Optional[bool] = Field(None, description="force QuickGELU; default: as the pretrained tag says")
    download: bool = Field(True, description="download missing weights (never when HF_HUB_OFFLINE=1)")
    cache_dir: Optional[str] = Field(None, description="Hugging Face cache folder for the weights")
    attention: Literal["math", "auto"] = Field(
        "math", description="math: twice-differentiable attention (needed for Hessian terms); auto: fastest")

    @model_validator(mode="after")
    def _weights_and_model_fit(self):
        if not self.pretrained and not self.checkpoint:
            raise ValueError("pretrained: null needs checkpoint (a local weights file); or give an open_clip tag "
                             f"such as {DEFAULT_PRETRAINED!r}")
        problem = model_config_problem(self.model_config_path, self.model)
        if problem:
            raise ValueError(problem)
        return self


def options_problems(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field: message; ...``."""
    return "; ".join(": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in exc.errors())


class ClipTextEnergy(Energy):
    """E(x) = 1 - cos(f_img(x), f_txt(prompt))  or  ||f_txt(prompt) - f_img(x)||_2."""

    Options = ClipTextOptions

    def __init__(self, visual: nn.Module, text_embedding: torch.Tensor, preprocess: ClipPreprocess,
                 distance: str = "cosine", attention: str = "math"):
        super().__init__()
        if distance not in ("cosine", "l2"):
            raise ConfigError(f"clip-text distance must be 'cosine' or 'l2', got {distance!r}")
        self.visual, self.preprocess = visual, preprocess
        self.distance, self.attention = distance, attention
        self.register_buffer("text", text_embedding.detach().float().reshape(1, -1))

    @classmethod
    def from_clip(cls, loaded: LoadedClip, prompt: str, distance: str = "cosine",
                  attention: str = "math") -> "ClipTextEnergy":
        """Encode the prompt once; keep only the image tower."""
        import open_clip

        tokenizer = open_clip.get_tokenizer(loaded.name)
        device = next(loaded.model.parameters()).device
        with torch.no_grad():
            text = loaded.model.encode_text(tokenizer([prompt]).to(device)).float()
        return cls(loaded.model.visual, text, ClipPreprocess(loaded.image_size, loaded.mean, loaded.std).to(device),
                   distance, attention)

    def train(self, mode: bool = True) -> "ClipTextEnergy":
        """A frozen network: always in eval mode, whatever the caller asks."""
        return super().train(False)

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        with attention_context(self.attention):
            out = self.visual(self.preprocess(images.float()))
        return (out[0] if isinstance(out, tuple) else out).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.image_embedding(images)
        text = self.text.expand_as(emb)
        if self.distance == "cosine":
            return 1.0 - F.cosine_similarity(emb, text, dim=1, eps=1e-8)
        return (text - emb).norm(dim=1)


def build_clip_text(context: BuildContext, **options: Any) -> ClipTextEnergy:
    """CLIP text guidance (open_clip; default ViT-B/16 with OpenAI weights)."""
    try:
        opts = ClipTextOptions.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(f"clip-text options: {options_problems(exc)}") from None
    loaded = load_open_clip(model=opts.model, pretrained=opts.pretrained, checkpoint=opts.checkpoint,
                            model_config=opts.model_config_path, quick_gelu=opts.quick_gelu,
                            download=opts.download, cache_dir=opts.cache_dir, device=context.device,
                            what="clip-text")
    return ClipTextEnergy.from_clip(loaded, opts.prompt, opts.distance, opts.attention).to(context.device)

