"""ZMagicPipeline, the diffusers-style entry point, on tiny SD and SDXL folders saved by diffusers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from zmagic_core import ConfigError, FilePath, ZMagicPipeline, hookimpl, load_image, save_image
from zmagic_core.assembly import build
from zmagic_core.method.combiners import CAGradCombiner
from zmagic_core.method.guidance import Condition
from zmagic_core.plugins.registry import Registry

from .conftest import SD_SIZE, ColorEnergy, reference_image
from .test_sdxl import sdxl_dir  # noqa: F401  (the session fixture)

README = Path(__file__).resolve().parents[3] / "README.md"
README_ID = "CompVis/stable-diffusion-v1-4"


class MeanColourEnergy(torch.nn.Module):
    """An image-statistics energy: distance of the mean colour to the reference image's."""

    def __init__(self, reference: torch.Tensor):
        super().__init__()
        self.register_buffer("target", reference.mean(dim=(1, 2)))

    def forward(self, images):
        return (images.mean(dim=(2, 3)) - self.target.to(images.dtype)).norm(dim=1)


class StyleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: FilePath


class StylePlugin:
    """Registers ``style`` (the style plugin's kind) as the mean-colour energy: the core has no CLIP."""

    @hookimpl
    def register_energies(self, register):
        register("style", lambda context, reference: MeanColourEnergy(load_image(reference)), options=StyleOptions)


@pytest.fixture(autouse=True)
def style_registry(monkeypatch):
    registry = Registry(load_entry_points=False)
    registry.register_plugin(StylePlugin(), "test-style")
    monkeypatch.setattr(build, "get_registry", lambda: registry)
    return registry


@pytest.fixture(scope="module")
def sd_pipeline_dir(sd_dir, tmp_path_factory) -> Path:
    """The tiny SD parts as StableDiffusionPipeline.save_pretrained writes them (model_index.json)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd-pipeline")
    StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(sd_dir / "vae"),
                            text_encoder=CLIPTextModel.from_pretrained(sd_dir / "text_encoder"),
                            tokenizer=CLIPTokenizer.from_pretrained(sd_dir / "tokenizer"),
                            unet=UNet2DConditionModel.from_pretrained(sd_dir / "unet"),
                            scheduler=DDIMScheduler.from_pretrained(sd_dir / "scheduler"), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(root)
    return root


@pytest.fixture
def style_png(tmp_path) -> Path:
    path = tmp_path / "style.png"
    save_image(reference_image(SD_SIZE)[0], path)
    return path


def call(pipe, style_png, **kwargs):
    options = dict(prompt="a striped painting", conditions=[{"kind": "style", "reference": str(style_png),
                                                             "scale": 0.5}],
                   combiner="dependent", steps=4, seeds=[0, 1], progress=False)
    return pipe(**{**options, **kwargs})


@pytest.mark.parametrize("folder, kind", [("sd_pipeline_dir", "stable-diffusion"), ("sdxl_dir", "stable-diffusion-xl")])
def test_from_pretrained_guesses_the_kind_and_returns_pil_images(request, style_png, folder, kind):
    pipe = ZMagicPipeline.from_pretrained(str(request.getfixturevalue(folder)), device="cpu")
    assert pipe.kind == kind and pipe.model.sample_shape == (4, SD_SIZE // 2, SD_SIZE // 2)  # diffusers' size
    out = call(pipe, style_png)
    assert [image.size for image in out.images] == [(SD_SIZE, SD_SIZE)] * 2
    assert all(image.mode == "RGB" for image in out.images)
    assert out.image_tensors.shape == (2, 3, SD_SIZE, SD_SIZE) and out.samples.shape == (2, 4, SD_SIZE // 2, SD_SIZE // 2)
    assert torch.isfinite(out.samples).all() and not out.errors and out.seeds == [0, 1]
    assert out.condition_names == ["prompt", "style"] and set(out.trace[0][-1]["energy"]) == {"prompt", "style"}
    assert "cos(g1,g2|1)" in out.trace[0][0]  # the dependent combiner ran


def test_seeds_reproduce(sd_pipeline_dir, style_png):
    pipe = ZMagicPipeline.from_pretrained(str(sd_pipeline_dir), device="cpu")
    one = call(pipe, style_png, seeds=[3], combiner="sum")
    two = call(pipe, style_png, seeds=None, num_images=2, seed=3, combiner="sum")
    assert two.seeds == [3, 4]
    assert torch.equal(call(pipe, style_png, seeds=[3], combiner="sum").samples, one.samples)
    torch.testing.assert_close(two.samples[:1], one.samples, rtol=1e-3, atol=1e-4)  # batch of 2: float rounding
    assert not torch.equal(two.samples[0], two.samples[1])
    other_prompt = call(pipe, style_png, seeds=[3], combiner="sum", prompt="the stair")
    assert not torch.equal(other_prompt.samples, one.samples)


@pytest.mark.parametrize("conditions, combiner, match", [
    ([{"kind": "no-such-energy"}], "dependent", r"conditions\.0\.kind: .*no-such-energy"),
    ([{"kind": "style", "reference": "x.png", "colour": 1}], "sum", r"conditions\.0\.options\.colour"),
    ([{"kind": "style", "reference": "x.png"}], "no-such-combiner", r"combiner\.kind: .*no-such-combiner"),
    ([{"kind": "style", "reference": "x.png"}] * 2, "dependent", r"'dependent' needs exactly 2 conditions, .* has 3"),
])
def test_bad_calls_fail_before_sampling_with_a_recipe_message(sd_pipeline_dir, conditions, combiner, match):
    pipe = ZMagicPipeline.from_pretrained(str(sd_pipeline_dir), device="cpu")
    with pytest.raises(ConfigError, match=match) as info:
        pipe(prompt="x", conditions=conditions, combiner=combiner, steps=2, seeds=[0], progress=False)
    with pytest.raises(ConfigError) as as_recipe:  # the same entries in a recipe: the same message
        build.load_recipe({"model": {"kind": "stable-diffusion", "prompt": "x"}, "combiner": combiner,
                           "conditions": conditions})
    assert str(info.value) == str(as_recipe.value)


def test_condition_and_combiner_objects_mix_with_recipe_dicts(sd_pipeline_dir, style_png):
    pipe = ZMagicPipeline.from_pretrained(str(sd_pipeline_dir), device="cpu")
    colour = Condition("colour", ColorEnergy(), "adaptive", 0.5)
    out = call(pipe, style_png, conditions=[colour, {"kind": "style", "reference": str(style_png)}],
               combiner=CAGradCombiner(c=0.5), seeds=[0])
    assert out.condition_names == ["prompt", "colour", "style"] and not out.errors
    with pytest.raises(ConfigError, match="conditions, got 3"):
        call(pipe, style_png, conditions=[colour, {"kind": "style", "reference": str(style_png)}],
             combiner="dependent", seeds=[0])
    with pytest.raises(ConfigError, match="combiner.kind"):
        call(pipe, style_png, conditions=[colour], combiner="no-such-combiner", seeds=[0])


def test_from_pipe_reuses_the_loaded_components(sdxl_dir, style_png):  # noqa: F811
    from diffusers import StableDiffusionXLPipeline

    loaded = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe = ZMagicPipeline.from_pipe(loaded)
    assert pipe.kind == "stable-diffusion-xl" and pipe.model.unet is loaded.unet and pipe.model.vae is loaded.vae
    reference = call(ZMagicPipeline.from_pretrained(str(sdxl_dir), device="cpu"), style_png)
    torch.testing.assert_close(call(pipe, style_png).samples, reference.samples, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="from_pipe reuses"):
        ZMagicPipeline.from_pipe(loaded, dtype="float16")
    with pytest.raises(ConfigError, match="ZMagicPipeline knows"):
        ZMagicPipeline.from_pipe(object())


def test_a_folder_of_unknown_class_asks_for_the_kind(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ConfigError, match=r"KandinskyPipeline; ZMagicPipeline knows .*\(pass kind="):
        ZMagicPipeline.from_pretrained(str(tmp_path))


def test_readme_from_diffusers_snippet_runs(sd_pipeline_dir, style_png, monkeypatch):
    """The README's five lines as written, the hub id replaced by the tiny folder."""
    section = README.read_text().split("## From diffusers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.count(README_ID) == 1 and len([line for line in code.splitlines() if line.strip()]) == 5
    monkeypatch.chdir(style_png.parent)  # the snippet names style.png and writes portrait.png here
    namespace: dict = {}
    exec(compile(code.replace(README_ID, str(sd_pipeline_dir)), "README.md", "exec"), namespace)
    assert namespace["out"].images[0].size == (SD_SIZE, SD_SIZE)
    assert load_image(style_png.parent / "portrait.png").shape == (3, SD_SIZE, SD_SIZE)
