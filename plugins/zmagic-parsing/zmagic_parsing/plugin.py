"""Entry point (group ``zmagic``): registers the ``parsing`` energy."""
from zmagic_core.hookspecs import hookimpl

from .energy import build_parsing


@hookimpl
def register_energies(register):
    register("parsing", build_parsing, aliases=("face-parsing",))
