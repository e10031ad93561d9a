"""Weight files, found and loaded safely: the one set of helpers every model and plugin uses.

* :func:`find_weights`: the ``weights`` option as given, else ``filename`` (or an alternative name) in
  $ZMAGIC_WEIGHTS_DIR, ~/.cache/zmagic/weights, the torch hub checkpoint folder (in that order), else
  an optional download; a :class:`~zmagic_core.WeightsNotFoundError` names every place searched.
* :func:`read_state_dict`: tensors only (``.safetensors``, or ``torch.load(weights_only=True)``, so
  pickled code is refused); unwraps ``state_dict`` / ``model`` levels and a DataParallel prefix.
* :func:`load_strict`: every key and shape must match, else an error with a readable diff.
* :func:`hub_offline`, :func:`unreachable`: whether a download may be tried at all (one TCP probe,
  so an offline machine fails at once instead of after a client's retries).

safetensors is imported only when a ``.safetensors`` file is read.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from zmagic_core.contracts.errors import InputError, WeightsNotFoundError, clip_text

WEIGHTS_DIR_ENV = "ZMAGIC_WEIGHTS_DIR"


def torch_hub_checkpoints() -> Path:
    """Where torch.hub (and facenet-pytorch, face-alignment) cache downloaded checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def search_dirs() -> list[Path]:
    """$ZMAGIC_WEIGHTS_DIR, ~/.cache/zmagic/weights, then the torch hub checkpoint folder."""
    dirs = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        dirs.append(Path(os.environ[WEIGHTS_DIR_ENV]).expanduser())
    dirs.append(Path("~/.cache/zmagic/weights").expanduser())
    dirs.append(torch_hub_checkpoints())
    return dirs


def find_weights(what: str, filename: str, explicit: Optional[str], how_to_get: str,
                 url: Optional[str] = None, download: bool = False,
                 downloader: Optional[Callable[[str, str], None]] = None,
                 alternatives: tuple[str, ...] = ()) -> Path:
    """The weight file to load, or a WeightsNotFoundError saying what, where we looked and where to get it.

    An explicit path is used as given (never downloaded).  Otherwise ``filename`` is looked up in
    :func:`search_dirs` (then each of ``alternatives``, relative names such as ``sub/file.pth``, in
    every folder); if absent and ``download`` is set, ``url`` is fetched into the torch hub folder.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            raise InputError(f"{what} weights: {path} is a folder; give the weights file itself ({filename!r})")
        raise WeightsNotFoundError(f"{what} weights not found: {path} does not exist. {how_to_get}")
    looked = [d / name for d in search_dirs() for name in (filename, *alternatives)]
    for path in looked:
        if path.is_file():
            return path
    tried = ""
    # a download library's own urllib call has no timeout: offline, or with the host silent, do not start it
    why = ("offline mode is on (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or DIFFUSERS_OFFLINE)" if hub_offline()
           else unreachable(url)) if download and url else None
    if why:
        tried = f" Downloading {url} was not tried: {why}."
    elif download and url:
        target = torch_hub_checkpoints() / filename
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            (downloader or torch.hub.download_url_to_file)(url, str(target))
            if target.is_file():
                return target
        except Exception as exc:  # no network, HTTP error, disk full: say so, plainly
            tried = f" Downloading {url} failed ({type(exc).__name__}: {exc})."
    where = ", ".join(str(p) for p in looked)
    raise WeightsNotFoundError(f"{what} weights {filename!r} not found; looked in: {where}.{tried} {how_to_get} "
                               f"Put the file in one of those folders, set ${WEIGHTS_DIR_ENV}, or pass 'weights'.")


STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


def read_state_dict(path: Union[str, Path], what: str = "weights") -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file loaded with weights_only=True.

    Unwraps {'state_dict': ...} / {'model': ...} checkpoints (Lightning, CompVis) and strips a
    DataParallel 'module.' prefix.  A missing file is a WeightsNotFoundError; anything else that
    cannot be read as tensors (a pickle with code, a TorchScript archive, a corrupt file) an InputError.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{what}: {path} is a folder; give the weights file itself")
    if not path.is_file():
        raise WeightsNotFoundError(f"{what}: weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InputError(f"{what}: cannot read weights file {path}: reading .safetensors files needs the "
                             f"safetensors package (pip install safetensors)") from None
    try:
        with warnings.catch_warnings():  # torch's own warnings about the file would print above our one line
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # no ANSI codes
        refused = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        if refused:  # torch's text advises weights_only=False: the opposite of what a user file should get
            raise InputError(f"{what}: cannot read weights file {path}: it holds pickled Python objects, not only tensors "
                             f"({clip_text(refused.group(1), 200)}), which the safe load (torch.load weights_only=True) "
                             f"refuses: save the state dict (torch.save(model.state_dict(), ...)) or convert it to "
                             f".safetensors") from None
        first = text.splitlines()[0][:300] if text else ""
        raise InputError(f"{what}: cannot read weights file {path} as safetensors or as a plain torch state "
                         f"dict (torch.load weights_only=True): {type(exc).__name__}: {first}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"{what}: weights file {path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Union[str, Path], what: str,
                ignore_prefixes: tuple[str, ...] = (), prefix: Optional[str] = None) -> nn.Module:
    """load_state_dict(strict=True) with a readable error naming the file and the mismatched keys.

    ``prefix``: keep only the keys under it, stripped (e.g. ``model.diffusion_model.`` of a full
    checkpoint), when any key has it.  BatchNorm ``num_batches_tracked`` counters missing from old
    (torch 0.4) checkpoints are filled in.
    """
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = model.state_dict()
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"wrong shape {few(wrong)}" if wrong else ""]
        raise InputError(f"weights file {path} does not fit the {what} architecture: "
                         + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)
    return model


# -- may a download be tried? -----------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / DIFFUSERS_OFFLINE) as set now or at import."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # huggingface_hub missing (core-only install) or very old
        return False


def hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    except Exception:
        return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def unreachable(url: Optional[str] = None, timeout: float = 3.0) -> Optional[str]:
    """Why ``url`` (default: the Hugging Face endpoint) cannot be reached, or None if a TCP
    connection to its host opens within ``timeout`` seconds (one try, no retries)."""
    import socket
    from urllib.parse import urlparse

    url = url or hub_endpoint()
    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{parsed.hostname} cannot be reached ({exc})"
