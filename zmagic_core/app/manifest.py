"""`zmagic manifest`: experiment manifests (JSONL rows) for the paper's four tables, from the public
dataset layouts, N rows sampled with a seed.

Layouts read (as the datasets unpack):

- CelebA-HQ images (``--images``): a folder of ``<n>.jpg`` (or .png), n = 0 .. 29999, as
  ``CelebAMask-HQ/CelebA-HQ-img/``.
- CelebAMask-HQ parsing annotations (``--annotations``): ``CelebAMask-HQ-mask-anno/<k>/<n:05d>_<part>.png``
  (k = n // 2000; parts skin, hair, l_eye, ...).  An image is used as a segmentation reference only
  if it has annotations, so the layout the guide parses has ground truth beside it.
- Multi-Modal-CelebA-HQ captions (``--captions``): ``<n>.txt`` with one description per line (ten
  per image), as its ``celeba-caption/`` folder; one line is drawn per row.
- Table 2: a folder of style images (``--styles``) and a prompt list (``--prompts``, one a line).

Rows name files relative to the manifest's own folder (what ``zmagic experiment`` resolves them
against), so the manifest can move with the data.  Each table's row keys match the condition order
of its experiment file in examples/experiments/.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Callable

from zmagic_core.contracts.errors import InputError
from zmagic_core.files.atomic import write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def celebahq_images(folder: Path) -> dict[int, Path]:
    """CelebA-HQ image index -> file (``<n>.jpg``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"CelebA-HQ image folder not found: {folder}")
    found = {int(p.stem): p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit()}
    if not found:
        raise InputError(f"{folder} holds no CelebA-HQ images named <n>.jpg (e.g. CelebAMask-HQ/CelebA-HQ-img)")
    return found


def celebamask_annotated(folder: Path) -> set[int]:
    """Indices with CelebAMask-HQ part masks (``<k>/<n:05d>_<part>.png``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"CelebAMask-HQ annotation folder not found: {folder}")
    pattern = re.compile(r"^(\d{5})_[a-z_]+\.png$")
    found = {int(m.group(1)) for p in folder.glob("*/*.png") if (m := pattern.match(p.name))}
    if not found:
        raise InputError(f"{folder} holds no CelebAMask-HQ masks (<k>/<n:05d>_<part>.png, as CelebAMask-HQ-mask-anno)")
    return found


def mm_captions(folder: Path) -> dict[int, Path]:
    """Multi-Modal-CelebA-HQ caption files by image index (``<n>.txt``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"caption folder not found: {folder}")
    found = {int(p.stem): p for p in folder.glob("*.txt") if p.stem.isdigit()}
    if not found:
        raise InputError(f"{folder} holds no captions named <n>.txt (Multi-Modal-CelebA-HQ celeba-caption/)")
    return found


def _caption(path: Path, rng: random.Random) -> str:
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise InputError(f"caption file {path} is empty")
    return rng.choice(lines)


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(out).resolve().parent)


def _pick(pool: list[int], n: int, rng: random.Random, what: str) -> list[int]:
    if len(pool) < n:
        raise InputError(f"only {len(pool)} {what} available, {n} rows asked (--rows)")
    return rng.sample(sorted(pool), n)


def _other(pool: list[int], a: int, rng: random.Random) -> int:
    """Another image than ``a`` (a second person), drawn from ``pool``."""
    if len(pool) < 2:
        raise InputError("at least 2 images are needed (two different people per row)")
    while True:
        b = rng.choice(pool)
        if b != a:
            return b


def table1(args) -> list[dict]:
    """Text + segmentation + identity (Table 1): the caption and the layout of one image, the
    identity of another."""
    rng = random.Random(args.seed)
    images, annotated, captions = (celebahq_images(args.images), celebamask_annotated(args.annotations),
                                   mm_captions(args.captions))
    layout = _pick([n for n in images if n in annotated and n in captions], args.rows, rng, "annotated, captioned images")
    rows = []
    for i, a in enumerate(layout):
        b = _other(sorted(images), a, rng)
        rows.append({"id": f"{i:04d}-{a}-{b}", "conditions.0.prompt": _caption(captions[a], rng),
                     "conditions.1.reference": _rel(images[a], args.out),
                     "conditions.2.reference": _rel(images[b], args.out)})
    return rows


def table3(args) -> list[dict]:
    """Text + segmentation (Table 3): one image's caption and layout."""
    rng = random.Random(args.seed)
    images, annotated, captions = (celebahq_images(args.images), celebamask_annotated(args.annotations),
                                   mm_captions(args.captions))
    chosen = _pick([n for n in images if n in annotated and n in captions], args.rows, rng, "annotated, captioned images")
    return [{"id": f"{i:04d}-{a}", "conditions.0.prompt": _caption(captions[a], rng),
             "conditions.1.reference": _rel(images[a], args.out)} for i, a in enumerate(chosen)]


def table4(args) -> list[dict]:
    """Identity + landmarks (Table 4): the identity of one image, the pose (landmarks) of another."""
    rng = random.Random(args.seed)
    images = celebahq_images(args.images)
    ids = _pick(list(images), args.rows, rng, "images")
    rows = []
    for i, a in enumerate(ids):
        b = _other(sorted(images), a, rng)
        rows.append({"id": f"{i:04d}-{a}-{b}", "conditions.0.reference": _rel(images[a], args.out),
                     "conditions.1.reference": _rel(images[b], args.out)})
    return rows


def table2(args) -> list[dict]:
    """Text + style (Table 2): (prompt, style image) pairs drawn without replacement."""
    rng = random.Random(args.seed)
    folder = Path(args.styles)
    if not folder.is_dir():
        raise InputError(f"style image folder not found: {folder}")
    styles = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not styles:
        raise InputError(f"{folder} holds no images")
    prompt_file = Path(args.prompts)
    if not prompt_file.is_file():
        raise InputError(f"prompt list not found: {prompt_file}")
    prompts = [line.strip() for line in prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt list {prompt_file} is empty")
    pairs = [(p, s) for p in range(len(prompts)) for s in range(len(styles))]
    chosen = _pick(list(range(len(pairs))), args.rows, rng, "(prompt, style) pairs")
    return [{"id": f"{i:04d}-p{pairs[k][0]}-{styles[pairs[k][1]].stem}", "model.prompt": prompts[pairs[k][0]],
             "conditions.0.reference": _rel(styles[pairs[k][1]], args.out)} for i, k in enumerate(chosen)]


BUILDERS: dict[str, Callable] = {"table1": table1, "table2": table2, "table3": table3, "table4": table4}
NEEDS = {"table1": ("images", "annotations", "captions"), "table2": ("styles", "prompts"),
         "table3": ("images", "annotations", "captions"), "table4": ("images",)}


def add_manifest_arguments(p) -> None:
    p.add_argument("table", choices=sorted(BUILDERS),
                   help="table1: text + segmentation + ID; table2: text + style (SD); table3: text + "
                        "segmentation; table4: ID + landmarks")
    p.add_argument("--out", required=True, help="manifest file to write (.jsonl)")
    p.add_argument("--rows", type=int, default=500, help="rows to sample (the paper: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--images", help="CelebA-HQ images: a folder of <n>.jpg (CelebAMask-HQ/CelebA-HQ-img)")
    p.add_argument("--annotations", help="CelebAMask-HQ-mask-anno (<k>/<n:05d>_<part>.png)")
    p.add_argument("--captions", help="Multi-Modal-CelebA-HQ captions: a folder of <n>.txt (celeba-caption)")
    p.add_argument("--styles", help="table2: a folder of style images")
    p.add_argument("--prompts", help="table2: a text file, one prompt a line")


def check_arguments(args) -> None:
    missing = [f"--{k}" for k in NEEDS[args.table] if not getattr(args, k, None)]
    if missing:
        raise InputError(f"manifest {args.table} needs {', '.join(missing)}")
    if args.rows < 1:
        raise InputError("--rows must be at least 1")


def write_manifest(rows: list[dict], out: Path) -> None:
    out = Path(out)
    if out.suffix.lower() != ".jsonl":
        raise InputError(f"manifest {out}: write a .jsonl file")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
