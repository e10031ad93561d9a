"""Errors a user can act on: each names the thing that is wrong."""


class ZmagicError(Exception):
    """Base class of the errors zmagic reports to users without a traceback."""


class ConfigError(ZmagicError):
    """A recipe or component option is invalid."""


class UnknownComponentError(ConfigError):
    """A kind names no registered component."""

    def __init__(self, category: str, name: str, available):
        self.category, self.name, self.available = category, name, sorted(available)
        listed = ", ".join(self.available) or "none"
        super().__init__(f"unknown {category} kind {name!r}; available: {listed}")


class PluginError(ZmagicError):
    """A plugin failed to load or registered something twice."""


class InputError(ZmagicError):
    """A file or reference given by the user cannot be used (missing, unreadable, wrong shape)."""


class WeightsNotFoundError(ZmagicError):
    """Model weights are neither on disk nor reachable."""
