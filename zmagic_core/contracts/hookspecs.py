"""Hook specifications: what a zmagic plugin may provide.

Every hook receives a ``register`` callback, so one plugin can register several components::

    register(name, factory, options=OptionsModel, aliases=("other-name",), component=Class,
             adds_conditions=count)

* ``factory(context, **options)`` builds the component; ``context`` is a :class:`BuildContext`
  (device, dtype, the run seed, and for energies the base model, built first).
* ``options``: a pydantic model; a recipe's options are validated with it before anything loads,
  and the factory receives the validated values of the options the recipe sets (defaults stay the
  factory's to apply, e.g. by building the model).  Without it options pass through unchecked.
* ``component``: the class the factory builds, when known before building (a combiner's
  ``min_conditions`` / ``max_conditions`` are then checked against the recipe up front).
* ``adds_conditions`` (models only): ``count(options) -> int``, how many conditions the model puts
  before the recipe's own (Stable Diffusion's prompt), for that same up-front check.
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


@hookspec
def register_evaluators(register):
    """Register evaluator factories: each builds an ``Evaluator`` that adds metrics to a run's record."""
