"""The identity of a run folder: everything that changes what a sample looks like.

``folder_identity(plan)`` is a dict of three parts, stored in the folder's recipe.json; its hash
(``identity_hash``) is stored in every sample's JSON.  A run resumes into a folder only when the
identities are equal; ``identity_differences`` names what differs.

- ``recipe``: the recipe's fields (``assembly.recipe.recipe_identity``: not seeds, counts, output,
  progress or device), plus ``batch_size`` unless the run is batch-invariant (:func:`batch_invariant`).
- ``files``: a fingerprint of every file or folder named by an option declared as a path
  (``FilePath`` / ``PathOrName`` in a component's options model), keyed ``<where>.options.<key>``:
  a file's sha256; a folder's sha256 over the sorted listing of (relative path, size, sha256) of its
  files; a file larger than ``LARGE_FILE`` (256 MiB) is identified by (size, mtime) instead of its hash.
  A ``PathOrName`` value that names no existing file (a hub id, a prototype description) is a name:
  its value, in ``recipe``, is all that counts.
- ``versions``: zmagic-core, torch, each non-built-in plugin whose components the recipe uses, and
  diffusers when the model is a pretrained one (any model but ``shapes``).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

from zmagic_core.contracts.errors import InputError
from zmagic_core.assembly.recipe import recipe_identity
from zmagic_core.contracts.options import path_fields
from zmagic_core.files.atomic import sha256_file

LARGE_FILE = 256 * 2**20
BATCH_INVARIANT_MODELS = ("shapes",)  # the shapes world: its maths is bitwise independent of the batch


MAX_FOLDER_FILES = 10_000  # files in a folder named by a path option (a model folder holds tens)


def fingerprint(path: Path) -> Optional[dict]:
    """What identifies the contents of a file or folder (None when nothing exists at ``path``)."""
    path = Path(path)
    if path.is_file():
        return _file_entry(path)
    if path.is_dir():
        files = []
        for p in path.rglob("*"):  # bounded: a folder option naming "/" must not hash the disk
            if p.is_file():
                files.append(p)
                if len(files) > MAX_FOLDER_FILES:
                    raise InputError(f"{path} holds more than {MAX_FOLDER_FILES} files: too many to identify a run "
                                     f"by; name the model's own folder")
        listing = [[p.relative_to(path).as_posix(), _file_entry(p)] for p in sorted(files)]
        text = json.dumps(listing, sort_keys=True, separators=(",", ":"))
        return {"folder_sha256": hashlib.sha256(text.encode()).hexdigest(), "files": len(listing)}
    return None


def _file_entry(path: Path) -> dict:
    st = path.stat()
    if st.st_size > LARGE_FILE:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"size": st.st_size, "sha256": sha256_file(path)}


def _path_values(registration, options: dict) -> dict[str, Any]:
    """The values of the options declared as paths, the options model's default where unset."""
    model = registration.options
    if model is None:
        return {}
    defaults = {}
    for name, info in model.model_fields.items():
        if not info.is_required() and info.default_factory is None:
            defaults[info.alias or name] = info.default
    return {key: options.get(key, defaults.get(key)) for key in path_fields(model)}


def referenced_files(plan) -> dict[str, dict]:
    """Fingerprints of the files and folders the recipe's path options name, by option."""
    files = {}
    for where, (registration, options) in plan.parts.items():
        for key, value in _path_values(registration, options).items():
            if not isinstance(value, str) or not value:
                continue
            marker = path_fields(registration.options)[key]
            found = fingerprint(Path(value).expanduser())
            if found is None and marker.or_name:
                continue  # a name, not a path
            files[f"{where}.options.{key}"] = found or {"missing": value}
    return files


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _plugins_used(plan) -> dict[str, Any]:
    infos = {info.name: info for info in plan.registry.plugins()}
    return {reg.plugin: infos.get(reg.plugin) for reg, _ in plan.parts.values()}


def batch_invariant(plan) -> bool:
    """Whether a sample's bits do not depend on the batch it is drawn in: the shapes world with core
    components only (tested bitwise in tests/core/test_pipeline.py).  Networks (pretrained models,
    plugins' energies) are not: convolution and matmul kernels choose their algorithm by batch size."""
    if plan.parts["model"][0].name not in BATCH_INVARIANT_MODELS:
        return False
    return all(info is not None and info.builtin for info in _plugins_used(plan).values())


def package_versions(plan) -> dict[str, Optional[str]]:
    """Versions of the packages whose code makes the samples."""
    import torch

    versions = {"zmagic-core": _version("zmagic-core") or "dev", "torch": str(torch.__version__)}
    for name, info in sorted(_plugins_used(plan).items()):
        if info is None or not info.builtin:
            versions[f"plugin {name}"] = info.version if info is not None else None
    if plan.parts["model"][0].name not in BATCH_INVARIANT_MODELS:
        versions["diffusers"] = _version("diffusers")
    return versions


def folder_identity(plan) -> dict:
    """Everything that changes the samples of a checked recipe (see the module docstring)."""
    fields = recipe_identity(plan.recipe)
    if not batch_invariant(plan):
        fields["batch_size"] = plan.recipe.batch_size
    return {"recipe": fields, "files": referenced_files(plan), "versions": package_versions(plan)}


def identity_hash(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def identity_differences(old: dict, new: dict) -> list[str]:
    """What differs between two identities, in words: a recipe field by its path, a referenced file
    as ``<option> (file contents)``, a package as ``<name> version (old -> new)``."""
    old, new = old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}
    out = _diff_keys(old.get("recipe"), new.get("recipe"))
    old_files, new_files = old.get("files") or {}, new.get("files") or {}
    for key in sorted(set(old_files) | set(new_files)):
        a, b = old_files.get(key), new_files.get(key)
        if a == b:
            continue
        if b is None or "missing" in b:
            out.append(f"{key} (file missing)" if b else f"{key} (no longer a file)")
        elif "folder_sha256" in b or (a and "folder_sha256" in a):
            out.append(f"{key} (folder contents)")
        else:
            out.append(f"{key} (file contents)")
    old_v, new_v = old.get("versions") or {}, new.get("versions") or {}
    for key in sorted(set(old_v) | set(new_v)):
        if old_v.get(key) != new_v.get(key):
            out.append(f"{key} version ({old_v.get(key) or 'none'} -> {new_v.get(key) or 'none'})")
    return out


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "recipe"]


def environment(plan, device: str) -> dict:
    """Versions and device of this run, for record.json (more than the identity holds)."""
    import numpy
    import torch

    versions: dict[str, Any] = dict(package_versions(plan))
    versions.update({"python": platform.python_version(), "numpy": numpy.__version__})
    dev = torch.device(device)
    info: dict[str, Any] = {"type": dev.type}
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        info.update(name=torch.cuda.get_device_name(index), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(index))))
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    cpus=os.cpu_count())
    versions["device"] = info
    return versions
