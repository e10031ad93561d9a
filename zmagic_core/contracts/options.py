"""Markers that options models put on fields naming files, so the core treats them as paths.

A field annotated :data:`FilePath` (a file or folder) or :data:`PathOrName` (a path, or a name such
as a hub id or a prototype description) is the only kind of option the core rewrites as a path:
a relative value resolves against the recipe's folder, and the file's contents enter the identity
of a run folder.  An undeclared string option is never touched, whatever exists on disk.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any


@dataclass(frozen=True)
class PathOption:
    """``or_name``: the value may also be a name; it is a path only when such a file or folder exists."""

    or_name: bool = False


FilePath = Annotated[str, PathOption()]
PathOrName = Annotated[str, PathOption(or_name=True)]


def _markers(annotation: Any) -> list[PathOption]:
    found = [m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, PathOption)]
    for arg in typing.get_args(annotation):
        found += _markers(arg)
    return found


def path_fields(options_model: Any) -> dict[str, PathOption]:
    """The fields of a pydantic options model declared as paths (by alias where one is set)."""
    out = {}
    for name, info in getattr(options_model, "model_fields", {}).items():
        markers = [m for m in info.metadata if isinstance(m, PathOption)] + _markers(info.annotation)
        if markers:
            out[info.alias or name] = markers[0]
    return out
