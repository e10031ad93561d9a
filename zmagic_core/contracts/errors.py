"""Errors a user can act on: each names the thing that is wrong.

Messages stay short whatever the input: :func:`shorten` cuts a value shown in a message to a few
hundred characters (a 10 MB string in a recipe never reaches the terminal whole).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

SHOWN_CHARS = 200  # the most characters of one value a message shows


def shorten(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how long it was; large containers are
    not rendered whole to be cut afterwards."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except Exception:  # a value whose repr fails still gets a message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def clip_text(text: str, limit: int = 1000) -> str:
    """``text`` cut to ``limit`` characters (a message built from many parts)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


class ZmagicError(Exception):
    """Base class of the errors zmagic reports to users without a traceback.

    ``problems``: the separate problems the message lists, one line each (the CLI's ``check`` prints
    them one per line; ``str(exc)`` may hold them on several lines, the CLI prints it as one)."""

    def __init__(self, *args: Any, problems: Optional[Iterable[str]] = None):
        super().__init__(*args)
        self.problems: list[str] = list(problems) if problems is not None else [str(self)]


class ConfigError(ZmagicError):
    """A recipe or component option is invalid."""


class UnknownComponentError(ConfigError):
    """A kind names no registered component; ``hint`` says which package would provide it."""

    def __init__(self, category: str, name: str, available, hint: str = ""):
        self.category, self.name, self.available, self.hint = category, name, sorted(available), hint
        listed = ", ".join(self.available) or "none"
        super().__init__(f"unknown {category} kind {shorten(name)}; available: {listed}" + (f" {hint}" if hint else ""))


class PluginError(ZmagicError):
    """A plugin failed to load or registered something twice."""


class ContestedComponentError(PluginError):
    """Two installed plugins register the same name (or two distributions the same plugin name): a
    look-up of that name is refused, naming both, rather than picking one silently."""

    def __init__(self, category: str, name: str, owners: list[str]):
        self.category, self.name, self.owners = category, name, list(owners)
        super().__init__(f"{category} {shorten(name)} is registered by more than one plugin: "
                         f"{' and '.join(owners)}; uninstall one of them, or load only one with "
                         f"ZMAGIC_LOAD_PLUGINS=<plugin name>")


class InputError(ZmagicError):
    """A file or reference given by the user cannot be used (missing, unreadable, wrong shape)."""


class WeightsNotFoundError(ZmagicError):
    """Model weights are neither on disk nor reachable."""
