"""Finding and loading diffusers / transformers weights: local folders, the Hugging Face cache,
the hub; safe formats; clear errors when weights are missing.

Every loader goes through :func:`load_pretrained`, which turns whatever the hub client raises
(no network, offline mode, unknown repository, missing file) into a
:class:`~zmagic_core.errors.WeightsNotFoundError` that names the model id, where it was looked
for and how to get it.  Nothing from inside the hub client reaches the user as a traceback.

Safety: ``use_safetensors`` is left to prefer ``*.safetensors`` (diffusers falls back to
``*.bin`` only when no safetensors file exists, and then loads with
``torch.load(weights_only=True)``); single-file checkpoints go through
:func:`load_state_dict_file`, which never unpickles arbitrary objects.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError, WeightsNotFoundError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TRUE = {"1", "true", "yes", "on"}


def fp32(t: torch.Tensor) -> torch.Tensor:
    """Half precision up to float32; float32 and float64 (used by gradient checks) unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def parse_dtype(name: Optional[str], default: torch.dtype) -> torch.dtype:
    if name is None:
        return default if default in DTYPES.values() else torch.float32
    return DTYPES[name]


def resolve_device(name: Optional[str], default: torch.device) -> torch.device:
    return torch.device(name) if name is not None else torch.device(default)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / DIFFUSERS_OFFLINE) as set now or at import."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    except Exception:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


@dataclass
class Source:
    """Where a model comes from: a local folder, or a hub repository (maybe cached)."""

    name: str            # what the user wrote (id or path)
    root: str            # local folder, or the repo id
    local: bool
    revision: Optional[str] = None
    local_files_only: bool = False

    def where(self) -> str:
        if self.local:
            return f"local folder {self.root}"
        repo_dir = "models--" + self.root.replace("/", "--")
        return (f"not a local folder ({os.path.abspath(self.name)} does not exist); "
                f"Hugging Face cache {os.path.join(hub_cache_dir(), repo_dir)}")

    def how_to_get(self) -> str:
        if self.local:
            return (f"check that {self.root} holds a diffusers save_pretrained layout (config.json and "
                    f"*.safetensors / *.bin, per component subfolder)")
        return (f"on a machine with network run `huggingface-cli download {self.root}` (or "
                f"`hf download {self.root}`), then copy the cache folder to {hub_cache_dir()} here "
                f"(or set HF_HUB_CACHE), or save the model to a folder and pass that folder as the "
                f"model's id/path")

    def has_file(self, relative: str) -> Optional[bool]:
        """Whether ``relative`` exists: exact for folders, cache-or-hub for repositories, None if unknown."""
        if self.local:
            return (Path(self.root) / relative).is_file()
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(self.root, relative, revision=self.revision)
            if isinstance(cached, str):
                return True
            if cached is not None:  # the cache knows the file does not exist
                return False
        except Exception:
            pass
        if self.local_files_only or hub_offline():
            return None
        try:
            from huggingface_hub import file_exists

            return bool(file_exists(self.root, relative, revision=self.revision))
        except Exception:
            return None

    def is_cached(self) -> bool:
        """Whether some snapshot of this repository is in the local cache."""
        if self.local:
            return True
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(self.root, revision=self.revision, local_files_only=True,
                              allow_patterns=["*.json"])
            return True
        except Exception:
            return False


def resolve_source(model_id: Optional[str], path: Optional[str] = None, revision: Optional[str] = None,
                   local_files_only: bool = False) -> Source:
    """A local folder when ``path`` (must exist) or an existing folder ``model_id``; else a hub id."""
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise WeightsNotFoundError(
                f"model folder {path!r} not found (looked for {folder.resolve()}); give the folder written "
                f"by save_pretrained, or a hub id as `id`")
        return Source(path, str(folder), True)
    if model_id is None:
        raise ConfigError("give the model as `id` (hub id or local folder) or `path`")
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        return Source(model_id, str(folder), True)
    if model_id.startswith((".", "/", "~")) or os.sep in model_id.strip("/").replace("/", "", 1):
        raise WeightsNotFoundError(
            f"model folder {model_id!r} not found (looked for {folder.resolve()}); it is not a hub id either")
    source = Source(model_id, model_id, False, revision, local_files_only)
    if (local_files_only or hub_offline()) and not source.is_cached():
        mode = "local_files_only is set" if local_files_only else "HF_HUB_OFFLINE is set"
        raise WeightsNotFoundError(
            f"weights for {model_id!r} not found: {source.where()} has no copy, and the hub is not "
            f"consulted ({mode}). To get them: {source.how_to_get()}.")
    if not source.local and not source.is_cached():
        why = hub_unreachable()
        if why is not None:  # fail at once instead of after the hub client's retries
            raise WeightsNotFoundError(
                f"weights for {model_id!r} not found: {source.where()} has no copy, and {why}. "
                f"To get them: {source.how_to_get()}.")
    return source


def hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the hub endpoint cannot be reached (one TCP connect, no retries), or None if it can."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{endpoint} cannot be reached ({exc})"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def load_pretrained(cls, source: Source, subfolder: Optional[str] = None, what: str = "", **kwargs) -> Any:
    """``cls.from_pretrained`` on a source, with every failure turned into WeightsNotFoundError."""
    options: dict[str, Any] = dict(kwargs)
    if subfolder:
        options["subfolder"] = subfolder
    if not source.local:
        if source.revision:
            options["revision"] = source.revision
        if source.local_files_only or hub_offline():
            options["local_files_only"] = True
    try:
        return cls.from_pretrained(source.root, **options)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # the hub client and diffusers raise many types; all mean "not usable"
        part = f"{what or cls.__name__}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise WeightsNotFoundError(
            f"could not load {part} of {source.name!r} from {source.where()}: {_reason(exc)}. "
            f"To get it: {source.how_to_get()}.") from None


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .ckpt/.bin/.pt/.pth with ``torch.load(weights_only=True)``.

    Lightning / CompVis checkpoints keep the weights under ``state_dict``; that level is unwrapped.
    """
    file = Path(path).expanduser()
    if file.suffix not in (".safetensors", ".ckpt", ".bin", ".pt", ".pth"):
        raise ConfigError(f"checkpoint {path!r}: unknown format {file.suffix!r}; expected .safetensors, "
                          f".ckpt, .bin, .pt or .pth")
    if not file.is_file():
        raise WeightsNotFoundError(f"checkpoint file {path!r} not found (looked for {file.resolve()})")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsNotFoundError(
                f"checkpoint {path!r} could not be loaded safely (torch.load with weights_only=True): "
                f"{_reason(exc)}; convert it to .safetensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path!r} holds a {type(state).__name__}, not a state dict")
    return state


def load_weights_into(module: torch.nn.Module, path: str, prefix: Optional[str] = None) -> None:
    """Load a single-file state dict into ``module`` (keys may carry ``prefix``, which is stripped)."""
    state = load_state_dict_file(path)
    if prefix:
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        state = picked or state
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path!r} does not fit {type(module).__name__} (diffusers key names expected): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]})")


# -- noise schedules --------------------------------------------------------------------------
def _betas_for_alpha_bar(num: int, max_beta: float = 0.999) -> torch.Tensor:
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / num) / abar(i / num), max_beta) for i in range(num)],
                        dtype=torch.float64)


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """abar_t in float64 from a diffusers scheduler config (the same betas its schedulers build)."""
    num = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
    elif schedule == "linear":
        betas = torch.linspace(start, end, num, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, num, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(num)
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, num, dtype=torch.float64)) * (end - start) + start
    else:
        raise ConfigError(f"beta_schedule {schedule!r} is not supported (linear, scaled_linear, "
                          f"squaredcos_cap_v2, sigmoid or trained_betas)")
    if config.get("rescale_betas_zero_snr"):
        raise ConfigError("rescale_betas_zero_snr gives abar_T = 0, where the Tweedie estimate "
                          "x0 = (x - sqrt(1-abar) eps) / sqrt(abar) is undefined; not supported")
    return torch.cumprod(1.0 - betas, dim=0)


def read_scheduler_config(source: Source, subfolders: tuple[Optional[str], ...]) -> Optional[dict]:
    """The first scheduler config found among ``subfolders`` (None: none there)."""
    from diffusers import DDPMScheduler

    for sub in subfolders:
        name = f"{sub}/scheduler_config.json" if sub else "scheduler_config.json"
        if source.has_file(name) is False:
            continue
        if source.local and not source.has_file(name):
            continue
        try:
            kwargs = {"subfolder": sub} if sub else {}
            if not source.local and (source.local_files_only or hub_offline()):
                kwargs["local_files_only"] = True
            if not source.local and source.revision:
                kwargs["revision"] = source.revision
            return dict(DDPMScheduler.load_config(source.root, **kwargs))
        except Exception:
            continue
    return None


# -- prediction types ------------------------------------------------------------------------
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def output_to_eps(out: torch.Tensor, x_t: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """The network output converted to an epsilon prediction (all in float32).

    x_t = sqrt(abar) x0 + sqrt(1-abar) eps;  v = sqrt(abar) eps - sqrt(1-abar) x0, so
    eps = sqrt(abar) v + sqrt(1-abar) x_t;  from x0: eps = (x_t - sqrt(abar) x0) / sqrt(1-abar).
    """
    if prediction_type == "epsilon":
        return out
    a, s = math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))
    if prediction_type == "v_prediction":
        return a * out + s * x_t
    if prediction_type == "sample":
        return (x_t - a * out) / max(s, 1e-12)
    raise ConfigError(f"prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")
