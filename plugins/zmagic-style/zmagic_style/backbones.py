"""Feature extractors for Gram-matrix style energies.

Each backbone maps images (B, 3, H, W) in [-1, 1] to a list of feature maps shaped (B, C, N)
(C channels, N positions), resizing and normalising internally, differentiably.

* :class:`ClipTokens`: open_clip ViT patch tokens (class token dropped) after transformer block
  ``block`` (0-based; FreeDoM takes ``feats[2]``, the output of the third block of CLIP ViT-B/16).
* :class:`VggFeatures`: VGG19 activations at named layers (Gatys et al.: relu1_1 ... relu5_1),
  ImageNet-normalised input.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zmagic_clip import LoadedClip, attention_context
from zmagic_core import ConfigError, WeightsNotFoundError, hub_offline, unreachable


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"  # torchvision IMAGENET1K_V1
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
             512, 512, 512, 512, "M"]
GATYS_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


class Normalize(nn.Module):
    """[-1, 1] -> optional bicubic resize to ``size`` -> (x01 - mean) / std."""

    def __init__(self, size: Optional[int], mean, std):
        super().__init__()
        self.size = None if size is None else int(size)
        self.register_buffer("shift", (2 * torch.tensor(mean, dtype=torch.float32) - 1).view(1, 3, 1, 1))
        self.register_buffer("scale", (2 * torch.tensor(std, dtype=torch.float32)).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        images = images.float()
        if self.size is not None and images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return (images - self.shift) / self.scale


class ClipTokens(nn.Module):
    """Patch tokens of an open_clip ViT after block ``block``; the later blocks are dropped."""

    def __init__(self, loaded: LoadedClip, block: int = 2, attention: str = "math"):
        super().__init__()
        visual = loaded.model.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "conv1"):
            raise ConfigError(f"style: open_clip model {loaded.name!r} has no ViT image tower "
                              f"(the clip backbone needs a ViT, e.g. ViT-B-16)")
        if not 0 <= block < len(blocks):
            raise ConfigError(f"style: block must be in [0, {len(blocks) - 1}] for {loaded.name}, got {block}")
        visual.transformer.resblocks = blocks[: block + 1]  # later blocks are never used
        self.visual, self.block, self.attention = visual, block, attention
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.preprocess = Normalize(loaded.image_size, loaded.mean, loaded.std)

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if hasattr(v, "_embeds"):
            return v._embeds(x)
        x = v.conv1(x).flatten(2).transpose(1, 2)  # open_clip < 3: the same steps, spelled out
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with attention_context(self.attention):
            x = self._embeds(self.preprocess(images))
            if not self.batch_first:
                x = x.transpose(0, 1)
            for blk in self.visual.transformer.resblocks:
                x = blk(x)
            if not self.batch_first:
                x = x.transpose(0, 1)
        return [x[:, 1:, :].transpose(1, 2).float()]  # (B, D, N): drop the class token


def vgg19_layer_names() -> list[str]:
    """Names of the modules of VGG19's ``features``, in order: conv1_1, relu1_1, ..., pool5."""
    names, block, conv = [], 1, 1
    for v in VGG19_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


def vgg19_min_size(layer: str) -> int:
    """The smallest image side at which ``layer`` still has a feature map: each pool up to it halves the side."""
    names = vgg19_layer_names()
    return 2 ** sum(n.startswith("pool") for n in names[: names.index(layer) + 1])


def vgg19_features(upto: int) -> nn.Sequential:
    """VGG19's ``features`` modules 0..upto (torchvision's layout), non-inplace ReLUs."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = v
    return nn.Sequential(*layers[: upto + 1])


def vgg19_weights_file(weights: Optional[str], cache_dir: Optional[str], download: bool) -> Path:
    """A local VGG19 state dict: the given file, or torchvision's IMAGENET1K_V1 from the torch hub cache."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"style: VGG19 weights file not found: {path}. Give a torchvision VGG19 state dict "
                f"(e.g. {os.path.basename(VGG19_URL)} from {VGG19_URL}) or leave weights out to use "
                f"torchvision's IMAGENET1K_V1 from the torch hub cache.")
        return path
    folder = Path(cache_dir).expanduser() if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / os.path.basename(VGG19_URL)
    if target.is_file():
        return target
    if not download:
        why = "downloads are off (download: false)"
    elif hub_offline():
        why = "offline mode is on (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or DIFFUSERS_OFFLINE)"
    else:
        why = unreachable(VGG19_URL)  # one 3 s probe, so an offline machine fails at once
        why = f"{why} from this machine" if why else ""
    if not why:
        try:
            torch.hub.load_state_dict_from_url(VGG19_URL, model_dir=str(folder), map_location="cpu",
                                               check_hash=True, weights_only=True)
            return target
        except Exception as exc:
            why = f"the download failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    raise WeightsNotFoundError(
        f"style: VGG19 weights (torchvision IMAGENET1K_V1) are not on this machine: looked for {target}, "
        f"and {why}. To get them, on a machine with network run `python -c \"import torchvision; "
        f"torchvision.models.vgg19(weights='IMAGENET1K_V1')\"` (it saves {target.name} under "
        f"~/.cache/torch/hub/checkpoints) or download {VGG19_URL}, then copy the file to {folder} "
        f"or pass weights: /path/to/{target.name}.")


class VggFeatures(nn.Module):
    """VGG19 activations at ``layers`` (names from :func:`vgg19_layer_names`)."""

    def __init__(self, state: dict[str, torch.Tensor], layers: Sequence[str] = GATYS_LAYERS,
                 image_size: Optional[int] = 224, source: str = "state dict"):
        super().__init__()
        names = vgg19_layer_names()
        unknown = [n for n in layers if n not in names]
        if unknown or not layers:
            raise ConfigError(f"style: unknown VGG19 layers {unknown or 'none given'}; choose from {', '.join(names)}")
        self.layer_names = list(layers)
        self.taps = [names.index(n) for n in layers]
        self.features = vgg19_features(max(self.taps))
        if any(k.startswith("features.") for k in state):  # a full torchvision VGG19 (classifier ignored)
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        own = self.features.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or wrong:
            raise ConfigError(f"style: {source} is not a VGG19 state dict: missing {missing[:4]}, "
                              f"wrong shapes {wrong[:4]}")
        self.features.load_state_dict({k: state[k] for k in own})
        self.features.eval().requires_grad_(False)
        self.preprocess = Normalize(image_size, IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.preprocess(images)
        out: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out[i] = x.flatten(2)  # (B, C, H*W)
        return [out[t] for t in self.taps]  # in the order asked for
