"""Building an open_clip model with its weights, offline-first, with errors a user can act on.

Weights come from one of two places:

* ``checkpoint``: a local file (``.safetensors``, or a torch state dict read with
  ``torch.load(weights_only=True)``; never an arbitrary pickle or a TorchScript archive);
* ``pretrained``: an open_clip tag (default ``openai``), looked up in the Hugging Face cache first
  and downloaded only when allowed (``download=True``, ``HF_HUB_OFFLINE`` unset) and the hub is
  reachable (a 3 s probe, so an offline machine fails at once instead of retrying for ~25 s).

Anything that goes wrong raises one of the core's errors (``from zmagic_core import ...``:
ConfigError, InputError, WeightsNotFoundError) at build time.  Reading the state dict and deciding
whether a download may be tried are the core's weight helpers (``read_state_dict``, ``hub_offline``,
``unreachable``).

zmagic-style uses :class:`LoadedClip`, :func:`load_open_clip` and the constants below for its CLIP
backbone; it imports them from the package (``from zmagic_clip import ...``), not from this module.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from zmagic_core import ConfigError, InputError, WeightsNotFoundError, hub_offline, read_state_dict, unreachable

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedClip:
    """An open_clip model (eval mode, frozen) and what its preprocessing needs."""

    model: nn.Module
    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where the weights came from, for messages and logs


class _DropRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    root, flt = logging.getLogger(), _DropRandomInit()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def model_config_problem(model_config: Optional[str], model: Optional[str]) -> Optional[str]:
    """Why ``model`` cannot go with ``model_config`` (open_clip names a config after its file), or None."""
    stem = Path(model_config).stem if model_config else None
    if stem is None or model is None or model == stem:
        return None
    return (f"model: {model!r} does not match model_config {model_config}, which registers the model {stem!r} "
            f"(open_clip names a config after its file); set model: {stem} or leave model out")


def register_config(model_config: str, model: Optional[str]) -> str:
    """Add a custom open_clip config (a JSON file) and return the model name it registers."""
    import open_clip

    path = Path(model_config)
    if not path.is_file():
        raise InputError(f"open_clip model_config not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"open_clip model_config {path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"open_clip model_config {path} needs the keys embed_dim, vision_cfg and text_cfg")
    problem = model_config_problem(model_config, model)
    if problem:
        raise ConfigError(problem)
    open_clip.add_model_config(path)
    return path.stem


def hub_file(repo_id: str, filename: str, cache_dir: Optional[str], download: bool) -> tuple[Optional[str], str]:
    """(local path or None, why it is missing) for a file of a Hugging Face repository."""
    from huggingface_hub import hf_hub_download

    candidates = [filename]
    if filename.endswith(".bin"):
        candidates.insert(0, filename[: -len(".bin")].replace("pytorch_", "") + ".safetensors")
    for name in candidates:
        try:
            return hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True), ""
        except Exception:
            pass
    if not download:
        return None, "downloads are off (download: false)"
    if hub_offline():
        return None, "offline mode is on (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or DIFFUSERS_OFFLINE)"
    why = unreachable()  # the Hugging Face endpoint (HF_ENDPOINT), one 3 s probe
    if why:
        return None, f"{why} from this machine"
    try:
        return hf_hub_download(repo_id, filename, cache_dir=cache_dir), ""
    except Exception as exc:
        return None, f"the download failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"


def _hub_cache_dir(cache_dir: Optional[str]) -> str:
    if cache_dir:
        return cache_dir
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return "~/.cache/huggingface/hub"


def resolve_tag(name: str, tag: str, cache_dir: Optional[str], download: bool) -> tuple[str, dict]:
    """The local file for an open_clip pretrained tag, or a WeightsNotFoundError saying how to get it."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"open_clip has no pretrained tag {tag!r} for model {name!r}; known tags: "
                          f"{', '.join(tags) or 'none'}; or give a local file with checkpoint: /path")
    hub = cfg.get("hf_hub", "")
    if hub:
        if hub.endswith("/"):  # open_clip's convention: a repository with its default file name
            repo_id, filename = hub[:-1], "open_clip_pytorch_model.bin"
        else:
            repo_id, filename = os.path.split(hub)
        path, why = hub_file(repo_id, filename, cache_dir, download)
        if path:
            return path, cfg
        raise WeightsNotFoundError(
            f"CLIP weights {name} (pretrained={tag!r}) are not on this machine: looked in the Hugging Face "
            f"cache {_hub_cache_dir(cache_dir)} for {repo_id}/{filename}, and {why}. "
            f"To get them, on a machine with network run `hf download {repo_id} {filename} --local-dir clip-weights` "
            f"and pass checkpoint: clip-weights/{filename} (keep pretrained: {tag} so the preprocessing "
            f"matches), or run `python -c \"import open_clip; open_clip.create_model('{name}', "
            f"pretrained='{tag}')\"` there and copy its Hugging Face cache to {_hub_cache_dir(cache_dir)}."
        )
    url = cfg.get("url", "")
    target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if target.is_file():
        return str(target), cfg
    if not download:
        why = "downloads are off (download: false)"
    elif hub_offline():
        why = "offline mode is on (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or DIFFUSERS_OFFLINE)"
    else:
        why = unreachable(url)
        why = f"{why} from this machine" if why else ""
    if not why:
        try:
            from open_clip.pretrained import download_pretrained_from_url

            return download_pretrained_from_url(url, cache_dir=cache_dir), cfg
        except Exception as exc:
            why = f"the download failed ({type(exc).__name__}: {exc})"
    raise WeightsNotFoundError(
        f"CLIP weights {name} (pretrained={tag!r}) are not on this machine: looked for {target}, and {why}. "
        f"Download {url} on a machine with network and pass checkpoint: /path/to/{os.path.basename(url)}."
    )


def load_open_clip(model: Optional[str] = None, pretrained: Optional[str] = DEFAULT_PRETRAINED,
                   checkpoint: Optional[str] = None, model_config: Optional[str] = None,
                   quick_gelu: Optional[bool] = None, download: bool = True, cache_dir: Optional[str] = None,
                   device: torch.device | str = "cpu", what: str = "clip") -> LoadedClip:
    """Build an open_clip model and load its weights (see the module docstring)."""
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - a dependency of the plugin
        raise ConfigError(f"{what} needs open_clip_torch: pip install open_clip_torch ({exc})") from None

    name = register_config(model_config, model) if model_config else (model or DEFAULT_MODEL)
    name = name.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        raise ConfigError(f"{what}: unknown open_clip model {name!r}; give model_config: /path/to/config.json "
                          f"for a custom one, or one of {', '.join(open_clip.list_models()[:12])}, ...")

    tag_cfg: dict = {}
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"{what}: CLIP checkpoint not found: {path}. Give the path of a local open_clip state dict "
                f"(.safetensors, .bin or .pt), e.g. open_clip_pytorch_model.bin from `hf download "
                f"timm/vit_base_patch16_clip_224.openai open_clip_pytorch_model.bin --local-dir DIR`.")
        if pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
        source = str(path)
    elif pretrained:
        maybe_path = Path(pretrained).expanduser()
        if maybe_path.suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained:
            return load_open_clip(model, None, str(maybe_path), model_config, quick_gelu, download,
                                  cache_dir, device, what)
        path_str, tag_cfg = resolve_tag(name, pretrained, cache_dir, download)
        path, source = Path(path_str), f"{name}/{pretrained} ({path_str})"
    else:
        raise ConfigError(f"{what}: give pretrained (an open_clip tag such as 'openai') or checkpoint (a file)")

    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        with _quiet_random_init_warning():  # the weights are loaded just below
            clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, device="cpu")
    except Exception as exc:
        raise ConfigError(f"{what}: open_clip cannot build model {name!r}: {type(exc).__name__}: {exc}") from None

    state = read_state_dict(path, what)
    try:
        from open_clip.factory import resize_pos_embed

        if "logit_scale" in state and state["logit_scale"].ndim != clip.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
        resize_pos_embed(state, clip)
    except Exception:
        pass
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise ConfigError(
            f"{what}: checkpoint {path} does not fit open_clip model {name!r} ({lines[0]} {' '.join(lines[1:3])[:400]}); "
            f"check model / model_config") from None

    clip = clip.to(device).eval().requires_grad_(False)
    size = clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(tag_cfg.get("mean", OPENAI_MEAN))
    std = tuple(tag_cfg.get("std", OPENAI_STD))
    return LoadedClip(clip, name, size, mean, std, source)
