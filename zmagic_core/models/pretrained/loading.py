"""Finding and loading diffusers / transformers weights: local folders, the Hugging Face cache,
the hub; safe formats; clear errors when weights are missing.

Every loader goes through :func:`load_pretrained`, which turns whatever the hub client raises
(no network, offline mode, unknown repository, missing file) into a
:class:`~zmagic_core.contracts.errors.WeightsNotFoundError` that names the model id, where it was looked
for and how to get it.  Nothing from inside the hub client reaches the user as a traceback.

Safety: ``use_safetensors`` is left to prefer ``*.safetensors`` (diffusers falls back to
``*.bin`` only when no safetensors file exists, and then loads with
``torch.load(weights_only=True)``); single-file checkpoints go through
:func:`load_checkpoint_into`, which reads them with the core's safe reader (never unpickling code).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from zmagic_core.contracts.errors import ConfigError, WeightsNotFoundError
from zmagic_core.files.weights import hub_offline, load_strict, read_state_dict, unreachable

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DIFFUSERS_EXTRA = 'pip install "zmagic-core[diffusers]"'
# what an options model of a pretrained kind declares; ``assembly.build`` checks it before anything loads
DIFFUSERS_MODULES = (("diffusers", DIFFUSERS_EXTRA),)
DIFFUSERS_AND_TRANSFORMERS = (("diffusers", DIFFUSERS_EXTRA), ("transformers", DIFFUSERS_EXTRA))


def require_modules(kind: str, modules: tuple[tuple[str, str], ...]) -> None:
    """Import each module a model kind needs; a ConfigError naming the extra instead of an ImportError."""
    import importlib

    for name, how in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"model kind {kind!r} needs the {name} package, which is not installed or does not "
                              f"import ({type(exc).__name__}: {exc}); install it: {how}") from None


def fp32(t: torch.Tensor) -> torch.Tensor:
    """Half precision up to float32; float32 and float64 (used by gradient checks) unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def parse_dtype(name: Optional[str], default: torch.dtype) -> torch.dtype:
    if name is None:
        return default if default in DTYPES.values() else torch.float32
    return DTYPES[name]


def resolve_device(name: Optional[str], default: torch.device) -> torch.device:
    return torch.device(name) if name is not None else torch.device(default)


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
    if folder.is_file():  # a single-file checkpoint is loaded over a model, not as one
        raise ConfigError(f"model id {model_id!r} is a file; `id` names a save_pretrained folder or a hub id, and a "
                          "single-file checkpoint goes in `checkpoint` (diffusers-pixel), `unet_checkpoint` "
                          "(stable-diffusion, -xl) or `transformer_checkpoint` (flow-transformer)")
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
        why = unreachable()
        if why is not None:  # fail at once instead of after the hub client's retries
            raise WeightsNotFoundError(
                f"weights for {model_id!r} not found: {source.where()} has no copy, and {why}. "
                f"To get them: {source.how_to_get()}.")
    return source


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


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def load_checkpoint_into(module: torch.nn.Module, path: str, prefix: Optional[str] = None) -> None:
    """Load a single-file state dict (diffusers key names; ``prefix`` stripped when present) into
    ``module``, strictly, through the core's safe reader."""
    file = Path(path).expanduser()
    if file.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"checkpoint {path!r}: unknown format {file.suffix!r}; expected "
                          f"{', '.join(CHECKPOINT_SUFFIXES)}")
    load_strict(module, read_state_dict(file, f"{type(module).__name__} checkpoint"), file, type(module).__name__, prefix=prefix)


def require_tokenizer(source: Source, subfolder: str) -> None:
    """Refuse a folder without the tokenizer a text encoder needs: transformers then builds an empty
    default one instead of failing, which encodes every prompt as unknown tokens."""
    if source.has_file(f"{subfolder}/tokenizer_config.json") is False:
        raise WeightsNotFoundError(f"model: {source.where()} has no {subfolder}/ (tokenizer_config.json); the "
                                   f"prompt cannot be tokenized. Save the pipeline's {subfolder} there")


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
