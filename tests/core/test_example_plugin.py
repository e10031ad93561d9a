"""The example third-party plugin from the README works through the public plugin path."""
import importlib.util
import sys
from pathlib import Path

import torch

from zmagic_core.assembly.build import build_pipeline, load_recipe
from zmagic_core.plugins.registry import Registry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "zmagic-brightness" / "zmagic_brightness" / "__init__.py"


def load_example():
    spec = importlib.util.spec_from_file_location("zmagic_brightness", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["zmagic_brightness"] = module
    spec.loader.exec_module(module)
    return module


def test_example_plugin_registers_and_guides():
    registry = Registry(load_entry_points=False)
    registry.register_plugin(load_example(), "brightness")
    assert registry.get("energy", "mean-brightness").name == "brightness"
    base = {"model": {"kind": "shapes", "size": 16}, "solver": {"kind": "ddpm", "steps": 30},
            "conditions": [{"kind": "brightness", "target": 0.6, "rule": "adaptive", "scale": 2.0}]}
    recipe = load_recipe(base, registry=registry)
    guided = build_pipeline(recipe, registry).run([0, 1, 2, 3], progress=False)
    plain = build_pipeline(load_recipe({**base, "conditions": []}, registry=registry), registry).run(
        [0, 1, 2, 3], progress=False)
    energy = lambda imgs: (imgs.mean(dim=(1, 2, 3)) - 0.6).abs()
    # the shapes prior holds images near grey backgrounds, so brightness moves only part of the way
    assert (energy(guided.images) < energy(plain.images)).all()
    assert energy(guided.images).mean() < 0.8 * energy(plain.images).mean()


def test_example_plugin_options_are_checked():
    import pytest
    from zmagic_core.contracts.errors import ConfigError

    registry = Registry(load_entry_points=False)
    registry.register_plugin(load_example(), "brightness")
    with pytest.raises(ConfigError, match=r"conditions.0.options.target"):
        load_recipe({"conditions": [{"kind": "brightness", "target": 3}]}, registry=registry)
