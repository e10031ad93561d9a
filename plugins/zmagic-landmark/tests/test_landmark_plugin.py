"""The installed plugin: found through its entry point, and a guided run on the shapes world with the
real O-Net weights lowers the landmark energy (crop box found on the reference only)."""
import pytest
import torch

from zmagic_core import BuildContext, Condition, DDPMSolver, Pipeline, ShapesModel, SumCombiner, get_registry
from zmagic_landmark.energy import LandmarkEnergy, LandmarkOptions


def test_registry_finds_landmark_through_the_entry_point():
    registry = get_registry()
    reg = registry.get("energy", "landmark")
    assert reg.plugin == "landmark" and reg.options is LandmarkOptions
    info = next(p for p in registry.plugins() if p.name == "landmark")
    assert info.errors == [] and info.registers == {"energy": ["landmark"]}


def test_guided_run_lowers_the_energy(astronaut_png):
    world = ShapesModel(size=64)
    # a fixed crop box: the astronaut's own face box is 14 px wide at 64 px, too small to steer shapes
    energy = get_registry().get("energy", "landmark").factory(BuildContext(model=world), reference=str(astronaut_png),
                                                          box=[0.2, 0.2, 0.8, 0.8])
    assert energy.box == pytest.approx((0.2, 0.2, 0.8, 0.8))
    assert isinstance(energy, LandmarkEnergy)
    run = dict(seeds=[0, 1, 2, 3], batch_size=4, progress=False)
    guided = Pipeline(world, DDPMSolver(), SumCombiner(),
                      [Condition("landmark", energy, rule="adaptive", scale=0.5)], steps=25).run(**run)
    plain = Pipeline(world, DDPMSolver(), SumCombiner(), [], steps=25).run(**run)
    with torch.no_grad():
        e_guided, e_plain = energy(guided.images), energy(plain.images)
    assert torch.isfinite(e_guided).all()
    assert e_guided.mean() < 0.9 * e_plain.mean(), (e_guided, e_plain)
