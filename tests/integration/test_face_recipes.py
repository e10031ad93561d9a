"""The face recipes of examples/faces/ (paper Tables 1, 3 and 4), run end to end with tiny models.

Each recipe file is loaded as written and then with overrides that swap the real weights for tiny
random-weight models of the same architectures, saved in the real formats: a diffusers
DDPMPipeline folder (tiny UNet2DModel), an open_clip model config + state dict, a full BiSeNet
state dict (79999_iter.pth layout), a tiny IR-SE (model_ir_se50.pth layout) and a FAN(1)
(2DFAN-4 layout).  The references are skimage's astronaut, whose face MTCNN (real weights, shipped
with facenet-pytorch) finds.  Everything else - combiner, condition order, rules, scales, windows,
energies' options - is the recipe's own.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from zmagic_core.assembly.build import load_recipe
from zmagic_core.app.runner import generate

FACES = Path(__file__).resolve().parents[2] / "examples" / "faces"

IMAGE_SIZE = 32  # side of the tiny UNet's images
PIXEL_UNET = dict(sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, block_out_channels=(4, 8),
                  layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
CLIP_NAME = "zmagic-faces-tiny-clip"
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
IRSE_UNITS, IRSE_WIDTHS = [1, 1, 1, 1], [16, 16, 32, 32]
PARSING_SIZE = 64  # BiSeNet input side (the real checkpoint runs at 512)
FAN_SIZE = 64  # FAN crop side (2DFAN-4 runs at 256)

# recipe file -> (combiner kind, condition names in order), as the paper's settings ask
EXPECTED = {
    "text_parsing_id": ("cagrad", ["text", "segmentation", "id"]),
    "text_parsing": ("dependent", ["text", "segmentation"]),
    "id_landmark": ("dependent", ["id", "landmark"]),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics, as a trained checkpoint has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=gen))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins for every weight file the face recipes need, plus a face reference."""
    import numpy as np
    import open_clip
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from face_alignment.models.fan import FAN
    from PIL import Image
    from skimage.data import astronaut

    from zmagic_faceid.irse import IRSEBackbone
    from zmagic_parsing.bisenet import BiSeNet

    root = tmp_path_factory.mktemp("face-recipes")
    paths: dict[str, Path] = {}

    torch.manual_seed(0)
    paths["pixel"] = root / "ddpm-tiny"
    DDPMPipeline(unet=UNet2DModel(**PIXEL_UNET), scheduler=DDPMScheduler()).save_pretrained(paths["pixel"])

    paths["clip_config"] = root / f"{CLIP_NAME}.json"
    paths["clip_config"].write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(paths["clip_config"])
    torch.manual_seed(0)
    clip = open_clip.create_model(CLIP_NAME, pretrained=None)
    paths["clip"] = root / "open_clip_pytorch_model.bin"
    torch.save({k: v.contiguous() for k, v in clip.state_dict().items()}, paths["clip"])

    torch.manual_seed(0)
    bisenet = BiSeNet(19).eval()  # the full architecture: there is no smaller BiSeNet option
    _randomise_batchnorm(bisenet, 1)
    paths["bisenet"] = root / "79999_iter.pth"
    torch.save(bisenet.state_dict(), paths["bisenet"])

    torch.manual_seed(0)
    irse = IRSEBackbone(IRSE_UNITS, IRSE_WIDTHS).eval()
    _randomise_batchnorm(irse, 2)
    paths["arcface"] = root / "model_ir_se50.pth"
    torch.save(irse.state_dict(), paths["arcface"])

    torch.manual_seed(0)
    fan = FAN(1).eval()
    _randomise_batchnorm(fan, 3)
    paths["fan"] = root / "2DFAN4-11f355bf06.pth.tar"
    torch.save(fan.state_dict(), paths["fan"])

    # the real model's resolution (256): MTCNN finds the astronaut's face there
    paths["face"] = root / "astronaut.png"
    Image.fromarray(np.asarray(astronaut())).resize((256, 256), Image.BICUBIC).save(paths["face"])
    return paths


def tiny_overrides(recipe_path: Path, tiny: dict[str, Path]) -> list[str]:
    """--set style overrides: tiny weights, the astronaut as every reference, few steps, one sample."""
    written = load_recipe(recipe_path, check=False)
    sets = [f"model.id={tiny['pixel']}", "solver.steps=4", "num_samples=1", "batch_size=1",
            "device=cpu", "dtype=float32"]
    per_kind = {
        "clip-text": {"model": CLIP_NAME, "model_config": tiny["clip_config"], "checkpoint": tiny["clip"]},
        "parsing": {"weights": tiny["bisenet"], "reference": tiny["face"], "input_size": PARSING_SIZE},
        "faceid": {"weights": tiny["arcface"], "reference": tiny["face"], "units": IRSE_UNITS,
                   "widths": IRSE_WIDTHS},
        "landmark": {"weights": tiny["fan"], "reference": tiny["face"], "fan_modules": 1,
                     "fan_input_size": FAN_SIZE},
    }
    for i, cond in enumerate(written.conditions):
        for key, value in per_kind[cond.kind].items():
            sets.append(f"conditions.{i}.{key}={value}")
    return sets


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_file_is_valid_as_written(name):
    """Every option name and value of the file passes the plugins' Options (no overrides)."""
    recipe = load_recipe(FACES / f"{name}.yaml")
    combiner, names = EXPECTED[name]
    assert recipe.combiner.kind == combiner
    assert [c.name for c in recipe.conditions] == names
    assert recipe.model.kind == "diffusers-pixel"
    assert recipe.model.options["id"] == "google/ddpm-ema-celebahq-256"
    assert (recipe.solver.kind, recipe.solver.steps) == ("ddpm", 100)
    freedom = {"clip-text": ("adaptive", 0.02), "parsing": ("fixed", 0.2), "faceid": ("fixed", 100.0),
               "landmark": ("fixed", 500.0)}
    for cond in recipe.conditions:
        assert (cond.rule, cond.scale) == freedom[cond.kind], cond
    header = (FACES / f"{name}.yaml").read_text()
    assert f"zmagic generate examples/faces/{name}.yaml --out outputs/{name}" in header


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_runs_end_to_end_with_tiny_models(name, tiny, tmp_path):
    path = FACES / f"{name}.yaml"
    written = load_recipe(path)
    recipe = load_recipe(path, overrides=tiny_overrides(path, tiny))
    combiner, names = EXPECTED[name]
    # only weights, references, sizes and run length changed: the method is the file's
    assert recipe.combiner == written.combiner
    assert [(c.kind, c.name, c.rule, c.scale, c.start, c.stop) for c in recipe.conditions] == \
        [(c.kind, c.name, c.rule, c.scale, c.start, c.stop) for c in written.conditions]

    out = tmp_path / name
    record = generate(recipe, out, progress=False)
    assert record["failed"] == {} and record["completed"] == [0]
    assert (out / "sample_0000.png").is_file() and (out / "grid.png").is_file()
    from PIL import Image

    assert Image.open(out / "sample_0000.png").size == (IMAGE_SIZE, IMAGE_SIZE)

    stored = json.loads((out / "record.json").read_text())
    assert stored["recipe"]["combiner"]["kind"] == combiner
    assert [c["name"] for c in stored["recipe"]["conditions"]] == names
    trace = stored["trace"]["0"]
    assert [step["t"] for step in trace] == [750, 500, 250, 0]
    for step in trace:  # every condition's energy at every step, inside or outside its window
        assert list(step["energy"]) and set(step["energy"]) == set(names), step
        assert all(math.isfinite(v) for v in step["energy"].values()), step
        assert "fallback" not in step, step
    first = trace[0]  # t = 750: every condition is inside its window, so all were guided
    # dependent computes the second condition's g at x_t only for the trace (trace_cosine): not by default
    assert set(first["grad_norm"]) == (set(names[:1]) if combiner == "dependent" else set(names))
    assert all(math.isfinite(v) and v > 0 for v in first["grad_norm"].values()), first
    assert first["guidance_norm"] > 0
    if combiner == "dependent":
        assert "cos(g1,g2|1)" in first  # Algorithm 1 ran (g_{2|1} through the first condition's step)
    assert set(stored["final_energy"]["0"]) == set(names)
