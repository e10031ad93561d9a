"""zmagic entry point (group ``zmagic``): registers the ``clip-text`` energy."""
from zmagic_core import hookimpl

from .energy import ClipTextOptions, build_clip_text


@hookimpl
def register_energies(register):
    register("clip-text", build_clip_text, options=ClipTextOptions)
