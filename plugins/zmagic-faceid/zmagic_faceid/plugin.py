"""Entry point of the zmagic-faceid plugin: registers the ``faceid`` energy."""
from zmagic_core.hookspecs import hookimpl

from .energy import build_faceid


@hookimpl
def register_energies(register):
    register("faceid", build_faceid, aliases=("face-id",))
