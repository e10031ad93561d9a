"""Discovery through the entry point, and a guided run on the shapes world."""
import importlib.metadata

import pytest
import torch

from zmagic_core import BuildContext, get_registry


def test_entry_point_is_installed():
    eps = [ep for ep in importlib.metadata.entry_points(group="zmagic") if ep.name == "parsing"]
    assert len(eps) == 1 and eps[0].value == "zmagic_parsing.plugin"


def test_registry_discovers_the_energy(checkpoint, images):
    registry = get_registry()
    reg = registry.get("energy", "parsing")
    assert reg.plugin == "parsing" and registry.get("energy", "face-parsing") is reg
    info = next(p for p in registry.plugins() if p.name == "parsing")
    assert info.errors == [] and info.registers == {"energy": ["parsing"]}
    assert reg.options.model_validate({"reference": "x.png"}).input_size == 512
    energy = reg.factory(BuildContext(), reference=str(images[0]), weights=str(checkpoint), input_size=32)
    assert energy(torch.zeros(2, 3, 32, 32)).shape == (2,)


def test_guided_run_lowers_the_energy(checkpoint, tmp_path, shapes_image):
    from zmagic_core import SumCombiner
    from zmagic_core import Condition
    from zmagic_core import save_image
    from zmagic_core import Pipeline
    from zmagic_core import ShapesModel
    from zmagic_core import DDPMSolver
    from zmagic_parsing import build_parsing

    world = ShapesModel(size=32)
    ref = tmp_path / "ref.png"
    save_image(shapes_image("triangle", "green", "right", 32), ref)
    energy = build_parsing(BuildContext(model=world), reference=str(ref), weights=str(checkpoint), input_size=32)
    seeds = [0, 1, 2, 3]
    guided = Pipeline(world, DDPMSolver(), SumCombiner(), [Condition("parsing", energy, rule="adaptive", scale=0.5)],
                      steps=25).run(seeds=seeds, batch_size=4, progress=False)
    plain = Pipeline(world, DDPMSolver(), SumCombiner(), [], steps=25).run(seeds=seeds, batch_size=4, progress=False)
    assert not guided.errors
    with torch.no_grad():
        e_guided, e_plain = energy(guided.images), energy(plain.images)
    assert torch.isfinite(e_guided).all()
    assert e_guided.mean() < 0.9 * e_plain.mean(), (e_guided, e_plain)
    assert (e_guided < e_plain).all(), (e_guided, e_plain)
