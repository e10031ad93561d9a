"""zmagic entry point (group ``zmagic``): registers the ``style`` energy."""
from zmagic_core.hookspecs import hookimpl

from .energy import build_style


@hookimpl
def register_energies(register):
    register("style", build_style)
