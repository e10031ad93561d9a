"""The model kinds through a recipe: build_pipeline with a test energy plugin, then a run."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from zmagic_core.contracts.hookspecs import hookimpl
from zmagic_core.assembly.build import build_pipeline
from zmagic_core.plugins.registry import Registry

from .conftest import SD_SIZE, GramEnergy, reference_image


class GramOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 8


def build_gram(context, size: int = 8):
    return GramEnergy(reference_image(size)).to(context.device)



class TestPlugin:
    @hookimpl
    def register_energies(self, register):
        register("test-gram", build_gram, options=GramOptions)


def registry():
    reg = Registry(load_entry_points=False)
    reg.register_plugin(TestPlugin(), "test-plugin")
    return reg


def test_pixel_recipe_builds_and_runs(pixel_dir):
    recipe = {"model": {"kind": "diffusers-pixel", "path": str(pixel_dir)},
              "solver": {"kind": "ddim", "steps": 4, "eta": 0.0},
              "combiner": {"kind": "dependent", "hessian": True},
              "conditions": [{"kind": "test-gram", "scale": 0.5}, {"kind": "test-gram", "name": "gram2"}],
              "num_samples": 2, "batch_size": 2, "progress": False}
    pipe = build_pipeline(recipe, registry())
    result = pipe.run([0, 1], batch_size=2, progress=False)
    assert not result.errors and result.images.shape == (2, 3, 8, 8)
    assert result.condition_names == ["test-gram", "gram2"]


def test_stable_diffusion_recipe_builds_and_runs(sd_dir):
    recipe = {"model": {"kind": "stable-diffusion", "path": str(sd_dir), "prompt": "stripes", "height": SD_SIZE,
                        "width": SD_SIZE, "decode_size": 8},
              "solver": {"kind": "ddim", "steps": 3},
              "combiner": {"kind": "cagrad", "c": 0.5},
              "conditions": [{"kind": "test-gram", "size": 8, "scale": 0.2}],
              "dtype": "bfloat16", "progress": False}
    pipe = build_pipeline(recipe, registry())
    assert next(pipe.model.unet.parameters()).dtype == torch.bfloat16  # the recipe's dtype reaches the model
    result = pipe.run([0], progress=False)
    assert not result.errors, result.errors
    assert result.condition_names == ["prompt", "test-gram"]
    assert result.images.shape == (1, 3, SD_SIZE, SD_SIZE)  # final decode at full size
    assert result.images.dtype == torch.float32
