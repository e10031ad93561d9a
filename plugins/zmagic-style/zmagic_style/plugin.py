"""zmagic entry point (group ``zmagic``): registers the ``style`` energy."""
from zmagic_core import hookimpl

from .energy import StyleOptions, build_style


@hookimpl
def register_energies(register):
    register("style", build_style, options=StyleOptions)
