"""Entry point of the zmagic-faceid plugin: registers the ``faceid`` energy."""
from zmagic_core import hookimpl

from .energy import FaceIDOptions, build_faceid


@hookimpl
def register_energies(register):
    register("faceid", build_faceid, options=FaceIDOptions, aliases=("face-id",))
