"""The core's own components, registered through the same hooks as any plugin."""
from pydantic import BaseModel, ConfigDict, Field

from zmagic_core.contracts.hookspecs import hookimpl
from zmagic_core.method.combiners import CAGradCombiner, DependentCombiner, SumCombiner
from zmagic_core.method.solvers import DDIMSolver, DDPMSolver, PCSolver
from zmagic_core.models.pretrained import (MODEL_FACTORIES, DiffusersPixelOptions, FlowTransformerOptions,
                                           StableDiffusionOptions, StableDiffusionXLOptions,
                                           prompt_conditions)  # diffusers: imported when built
from zmagic_core.models.shapes.energies import FACTORIES as SHAPES_ENERGIES, ENERGIES as SHAPES_ENERGY_CLASSES
from zmagic_core.models.shapes.evaluate import ShapesEvaluator
from zmagic_core.models.shapes.flow import ShapesFlowModel
from zmagic_core.models.shapes.world import ShapesModel


def _plain(cls):
    """A factory that ignores the context: for components that need no model or device."""
    def build(context, **options):
        return cls(**options)

    build.__doc__ = cls.__doc__
    return build


class ShapesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(32, ge=8, le=256, description="image side S")
    sigma0: float = Field(0.1, gt=0, description="standard deviation of each mixture component")


def shapes_model(context, **options):
    """The shapes world: a Gaussian mixture over rendered shapes with an exact score."""
    return ShapesModel(**options).to(context.device)


class ShapesFlowOptions(ShapesOptions):
    shift: float = Field(1.0, gt=0, description="SD3-style shift of the noise levels (1: none)")


def shapes_flow_model(context, **options):
    """The shapes world as a flow-matching model: the same mixture, its exact velocity field."""
    return ShapesFlowModel(**options).to(context.device)


@hookimpl
def register_models(register):
    register("shapes", shapes_model, options=ShapesOptions)
    register("shapes-flow", shapes_flow_model, options=ShapesFlowOptions)
    register("diffusers-pixel", MODEL_FACTORIES["diffusers-pixel"], options=DiffusersPixelOptions)
    register("stable-diffusion", MODEL_FACTORIES["stable-diffusion"], options=StableDiffusionOptions,
             adds_conditions=prompt_conditions)
    register("flow-transformer", MODEL_FACTORIES["flow-transformer"], options=FlowTransformerOptions,
             adds_conditions=prompt_conditions)
    register("stable-diffusion-xl", MODEL_FACTORIES["stable-diffusion-xl"], options=StableDiffusionXLOptions,
             adds_conditions=prompt_conditions)


@hookimpl
def register_solvers(register):
    for name, cls, aliases in (("ddpm", DDPMSolver, ("ancestral",)), ("ddim", DDIMSolver, ()), ("pc", PCSolver, ())):
        register(name, _plain(cls), options=cls.Options, aliases=aliases, component=cls)


@hookimpl
def register_combiners(register):
    for name, cls, aliases in (("sum", SumCombiner, ("independent", "freedom")), ("dependent", DependentCombiner, ("zmagic",)),
                               ("cagrad", CAGradCombiner, ())):
        register(name, _plain(cls), options=cls.Options, aliases=aliases, component=cls)


@hookimpl
def register_energies(register):
    for name, factory in SHAPES_ENERGIES.items():
        register(name, factory, options=SHAPES_ENERGY_CLASSES[name].Options, component=SHAPES_ENERGY_CLASSES[name])


@hookimpl
def register_evaluators(register):
    register("shapes", lambda context, **options: ShapesEvaluator())
