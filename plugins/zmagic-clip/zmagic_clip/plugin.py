"""zmagic entry point (group ``zmagic``): registers the ``clip-text`` energy."""
from zmagic_core.hookspecs import hookimpl

from .energy import build_clip_text


@hookimpl
def register_energies(register):
    register("clip-text", build_clip_text)
