"""Entry point (group ``zmagic``): registers the ``parsing`` energy."""
from zmagic_core import hookimpl

from .energy import ParsingOptions, build_parsing


@hookimpl
def register_energies(register):
    register("parsing", build_parsing, options=ParsingOptions, aliases=("face-parsing",))
