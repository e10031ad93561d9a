"""Hook specifications: what a zmagic plugin may provide.

Every hook receives a ``register`` callback, so one plugin can register several components:
``register(name, factory, aliases=())``.  A factory is called with a :class:`BuildContext`
and the component's options (keyword arguments) and returns the component.  A factory may carry
a pydantic model in its ``Options`` attribute; options are then checked before anything loads.
"""
import pluggy

hookspec = pluggy.HookspecMarker("zmagic")
hookimpl = pluggy.HookimplMarker("zmagic")


@hookspec
def register_energies(register):
    """Register energy factories (conditions): each builds an ``Energy`` module."""


@hookspec
def register_solvers(register):
    """Register solver factories: each builds a ``Solver`` (a step map Phi_t)."""


@hookspec
def register_combiners(register):
    """Register gradient combiner factories: each builds a ``Combiner``."""


@hookspec
def register_models(register):
    """Register base model factories: each builds a ``DiffusionModel``."""
