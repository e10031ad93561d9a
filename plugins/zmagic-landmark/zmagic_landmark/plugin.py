"""Entry point of the zmagic-landmark plugin: registers the ``landmark`` energy."""
from zmagic_core.hookspecs import hookimpl

from .energy import build_landmark


@hookimpl
def register_energies(register):
    register("landmark", build_landmark, aliases=("landmarks",))
