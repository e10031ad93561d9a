"""The installed plugin: found through its entry point, built through the registry, and a guided
run on the shapes world lowers the face-ID energy."""
import torch

from zmagic_core import BuildContext, Condition, DDPMSolver, Pipeline, ShapesModel, SumCombiner, get_registry
from zmagic_faceid.energy import FaceIDEnergy, FaceIDOptions


def test_registry_finds_faceid_through_the_entry_point(tiny_options):
    registry = get_registry()
    reg = registry.get("energy", "faceid")
    assert reg.plugin == "faceid" and reg.options is FaceIDOptions
    assert registry.get("energy", "face-id") is reg
    info = next(p for p in registry.plugins() if p.name == "faceid")
    assert info.errors == [] and info.registers == {"energy": ["faceid"]}
    energy = reg.factory(BuildContext(), **tiny_options)
    assert isinstance(energy, FaceIDEnergy)


def test_guided_run_lowers_the_energy(tiny_options):
    world = ShapesModel(size=64)
    energy = get_registry().get("energy", "faceid").factory(BuildContext(model=world), **tiny_options)
    run = dict(seeds=[0, 1, 2, 3], batch_size=4, progress=False)
    guided = Pipeline(world, DDPMSolver(), SumCombiner(),
                      [Condition("faceid", energy, rule="adaptive", scale=0.5)], steps=25).run(**run)
    plain = Pipeline(world, DDPMSolver(), SumCombiner(), [], steps=25).run(**run)
    with torch.no_grad():
        e_guided, e_plain = energy(guided.images), energy(plain.images)
    assert torch.isfinite(e_guided).all()
    assert e_guided.mean() < 0.9 * e_plain.mean(), (e_guided, e_plain)
