"""The core's own components, registered through the same hooks as any plugin."""
from pydantic import BaseModel, ConfigDict, Field

from .combiners import CAGradCombiner, DependentCombiner, SumCombiner
from .hookspecs import hookimpl
from .shapes.energies import ENERGIES
from .shapes.world import ShapesModel
from .solvers import DDIMSolver, DDPMSolver, PCSolver


def _plain(cls):
    """A factory that ignores the context: for components that need no model or device."""
    def build(context, **options):
        return cls(**options)

    build.Options = cls.Options
    build.component = cls
    build.__doc__ = cls.__doc__
    return build


class ShapesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(32, ge=8, le=256, description="image side S")
    sigma0: float = Field(0.1, gt=0, description="standard deviation of each mixture component")


def shapes_model(context, **options):
    """The shapes world: a Gaussian mixture over rendered shapes with an exact score."""
    return ShapesModel(**options).to(context.device)


shapes_model.Options = ShapesOptions


@hookimpl
def register_models(register):
    register("shapes", shapes_model)
    from .models import MODEL_FACTORIES

    for name, factory in MODEL_FACTORIES.items():
        register(name, factory)


@hookimpl
def register_solvers(register):
    register("ddpm", _plain(DDPMSolver), aliases=("ancestral",))
    register("ddim", _plain(DDIMSolver))
    register("pc", _plain(PCSolver))


@hookimpl
def register_combiners(register):
    register("sum", _plain(SumCombiner), aliases=("independent", "freedom"))
    register("dependent", _plain(DependentCombiner), aliases=("zmagic",))
    register("cagrad", _plain(CAGradCombiner))


@hookimpl
def register_energies(register):
    for name, factory in ENERGIES.items():
        register(name, factory)
