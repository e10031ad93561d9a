"""FID of each variant's images against a folder of reference images, with torchmetrics.

Why torchmetrics (``FrechetInceptionDistance``) rather than clean-fid: it is maintained by Lightning
with releases this year (clean-fid's last was 2022), it takes the feature network as a module (so a
test injects a small one and the maths runs offline, and a user's own extractor plugs in), it
accumulates statistics in float64, and its Inception is torch-fidelity's port of the TF-FID
network, whose weights it loads from a file we name.  clean-fid downloads its Inception to /tmp at
run time and has no hook for a local weights path.

Weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the Inception-v3 of the
original TF FID, converted), given by ``evaluation.fid.weights`` or looked up under that name in
$ZMAGIC_WEIGHTS_DIR, ~/.cache/zmagic/weights and the torch hub checkpoint folder (where torch-fidelity
caches its own download).  Never downloaded here; a missing file is reported with where to put it.

Reference images are resized (bicubic) to the generated images' size before both pass the same
feature network, as FreeDoM and the paper compute FID on CelebA-HQ at the model's resolution.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from zmagic_core.contracts.errors import InputError, WeightsNotFoundError
from zmagic_core.files.weights import find_weights, read_state_dict

FID_EVALUATOR = "FID (torchmetrics FrechetInceptionDistance)"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def inception(weights: Optional[str] = None) -> torch.nn.Module:
    """torchmetrics' Inception-v3 (torch-fidelity's TF-FID port) from a local weights file."""
    path = find_weights("FID Inception-v3", INCEPTION_FILE, weights,
                        f"Download it from {INCEPTION_URL} (torch-fidelity's release).")
    read_state_dict(path, "FID Inception-v3")  # tensors only: refuse a pickle with code before torch-fidelity loads it
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise InputError("FID needs torchmetrics and torch-fidelity: pip install 'zmagic-core[eval]'") from None
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(path))


def _load_uint8(path: Path, size: Optional[tuple[int, int]]) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def reference_images(folder: Path, limit: Optional[int] = None) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"FID reference folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise InputError(f"FID reference folder {folder} holds {len(files)} images; it needs at least 2")
    return files[:limit] if limit else files


def _update(metric, files: list[Path], real: bool, size, batch_size: int, device: str) -> None:
    for start in range(0, len(files), batch_size):
        batch = torch.stack([_load_uint8(p, size) for p in files[start:start + batch_size]])
        metric.update(batch.to(device), real=real)


def fid_many(generated: dict[str, list[Path]], reference: list[Path], feature: torch.nn.Module | int,
             batch_size: int = 32, device: str = "cpu", log: Callable = lambda *a: None) -> dict[str, float]:
    """FID of each named list of image files against the reference files (whose features are computed
    once); ``feature``: the feature network, uint8 (N, 3, H, W) in, (N, d) out."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature, normalize=False, reset_real_features=False).to(device)
    out, size = {}, None
    for name, files in generated.items():
        if len(files) < 2:
            continue
        if size is None:
            size = tuple(_load_uint8(files[0], None).shape[-2:])
            _update(metric, reference, True, size, batch_size, device)
        log(f"FID: {name} ({len(files)} images) against {len(reference)} reference images")
        metric.reset()  # the fake statistics only: reset_real_features=False keeps the reference's
        _update(metric, files, False, size, batch_size, device)
        out[name] = float(metric.compute())
    return out


def fid(generated: list[Path], reference: list[Path], feature: torch.nn.Module | int, batch_size: int = 32,
        device: str = "cpu") -> float:
    """FID between two lists of image files."""
    if len(generated) < 2:
        raise InputError(f"FID needs at least 2 generated images, got {len(generated)}")
    return fid_many({"generated": generated}, reference, feature, batch_size, device)["generated"]


def fid_for_variants(images: dict[str, list[Path]], spec, base: Path, feature: torch.nn.Module | None = None,
                     log: Callable = print) -> tuple[dict[str, float], Optional[str]]:
    """FID of every variant's images against ``spec.reference``: ({variant: fid}, note when skipped)."""
    try:
        reference = reference_images(Path(base) / spec.reference, spec.max_reference)
        network = feature if feature is not None else inception(spec.weights)
    except (InputError, WeightsNotFoundError) as exc:
        return {}, f"not computed: {exc}"
    return fid_many(images, reference, network, spec.batch_size, log=log), None
