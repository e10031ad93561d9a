"""Entry point of the zmagic-landmark plugin: registers the ``landmark`` energy."""
from zmagic_core import hookimpl

from .energy import LandmarkOptions, build_landmark


@hookimpl
def register_energies(register):
    register("landmark", build_landmark, options=LandmarkOptions, aliases=("landmarks",))
