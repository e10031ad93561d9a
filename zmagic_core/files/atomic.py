"""Atomic file writes: under its final name a file is either whole or absent, whenever the process dies.

Every write goes to a temporary file in the same folder (``.<name>.<pid>-<random>.zmagic-tmp``),
is flushed and fsynced, then ``os.replace``d onto the final name (atomic on POSIX file systems);
with ``sync_folder`` the folder is fsynced too, so the new name survives a power cut as well.  A
killed write leaves at most a temporary file, which :func:`clean_temporaries` removes and every
reader ignores.

JSON is strict: non-finite floats become ``null`` (``allow_nan=False`` guards the rest), so any
JSON parser reads the files.  ``ZMAGIC_TEST_WRITE_DELAY`` (seconds; for tests only) pauses in the
middle of every write, so that tests can kill a process while a file is half written.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Union

import numpy as np

TEMP_SUFFIX = ".zmagic-tmp"
WRITE_DELAY_ENV = "ZMAGIC_TEST_WRITE_DELAY"

PathLike = Union[str, Path]


def temp_path(path: PathLike) -> Path:
    """A fresh temporary name beside ``path`` (hidden, unique to this process and call)."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def is_temporary(path: PathLike) -> bool:
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def clean_temporaries(folder: PathLike) -> list[Path]:
    """Remove the temporary files that killed writes left in ``folder``; returns what was removed.
    Call it only while no other process writes into the folder (the runner holds its lock)."""
    removed = []
    for p in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def fsync_folder(folder: PathLike) -> None:
    """fsync a folder, making the names created or replaced in it durable (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _delay() -> float:
    try:
        return float(os.environ.get(WRITE_DELAY_ENV) or 0.0)
    except ValueError:
        return 0.0


def write_bytes(path: PathLike, data: bytes, sync_folder: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, replace; fsync the folder)."""
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            delay = _delay()
            if delay:  # tests: a window in which the temporary file is half written
                half = len(view) // 2
                _write_all(fd, view[:half])
                time.sleep(delay)
                view = view[half:]
            _write_all(fd, view)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    if sync_folder:
        fsync_folder(path.parent)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_text(path: PathLike, text: str, sync_folder: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), sync_folder)


def finite_json(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, numpy scalars and arrays as Python values, tuples as lists."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (NaN and infinities written as null)."""
    return json.dumps(finite_json(obj), allow_nan=False, indent=indent)


def write_json(path: PathLike, obj: Any, indent: int | None = None, sync_folder: bool = True) -> str:
    """Write ``obj`` as strict JSON atomically; returns the text written."""
    text = dumps_json(obj, indent)
    write_text(path, text, sync_folder)
    return text


def png_bytes(image: Any) -> bytes:
    """PNG file contents of an (H, W, 3) uint8 array or a PIL image."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """.npy file contents of ``array`` (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_png(path: PathLike, image: Any, sync_folder: bool = True) -> bytes:
    data = png_bytes(image)
    write_bytes(path, data, sync_folder)
    return data


def write_npy(path: PathLike, array: np.ndarray, sync_folder: bool = True) -> bytes:
    data = npy_bytes(array)
    write_bytes(path, data, sync_folder)
    return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
