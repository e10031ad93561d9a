"""Finding and safely loading weight files (safetensors, or torch.load with weights_only=True).

Shared by the plugins whose networks load plain state dicts (zmagic-faceid, zmagic-landmark); each
plugin keeps its own file names, download URLs and instructions and passes them in.

* :func:`find_weights`: the ``weights`` option as given, else ``filename`` in $ZMAGIC_WEIGHTS_DIR,
  ~/.cache/zmagic/weights, the torch hub checkpoint folder (in that order), else an optional download;
  a :class:`~zmagic_core.errors.WeightsNotFoundError` names every place searched.
* :func:`read_state_dict`: tensors only (``.safetensors``, or ``torch.load(weights_only=True)``:
  pickled code is refused); an :class:`~zmagic_core.errors.InputError` otherwise.
* :func:`load_strict`: ``load_state_dict(strict=True)`` with an error listing the mismatched keys.

safetensors is imported only when a ``.safetensors`` file is read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from zmagic_core.errors import InputError, WeightsNotFoundError

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
                 downloader: Optional[Callable[[str, str], None]] = None) -> Path:
    """The weight file to load, or a WeightsNotFoundError saying what, where we looked and where to get it.

    An explicit path is used as given (never downloaded).  Otherwise ``filename`` is looked up in
    :func:`search_dirs`; if absent and ``download`` is set, ``url`` is fetched into the torch hub folder.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        raise WeightsNotFoundError(f"{what} weights not found: {path} does not exist. {how_to_get}")
    looked = [d / filename for d in search_dirs()]
    for path in looked:
        if path.is_file():
            return path
    tried = ""
    if download and url:
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


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch pickle loaded with weights_only=True.

    Unwraps {'state_dict': ...} / {'model': ...} checkpoints and strips a DataParallel 'module.' prefix.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InputError(f"cannot read weights file {path}: reading .safetensors files needs the "
                             f"safetensors package (pip install safetensors)") from None
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"weights file {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str,
                ignore_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """load_state_dict(strict=True) with a readable error naming the file and the mismatched keys.

    BatchNorm ``num_batches_tracked`` counters missing from old (torch 0.4) checkpoints are filled in.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = model.state_dict()
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"wrong shape {few(wrong)}" if wrong else ""]
        raise InputError(f"weights file {path} does not fit the {what} architecture: "
                         + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)
    return model
