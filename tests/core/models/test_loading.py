"""Loading through the model kinds: round trips, layouts, checkpoints, dtypes, missing weights."""
from __future__ import annotations

import shutil
import time

import pytest
import torch

from zmagic_core.contracts.components import BuildContext
from zmagic_core.contracts.errors import ConfigError, InputError, WeightsNotFoundError
from zmagic_core.models.pretrained import MODEL_FACTORIES
from zmagic_core.plugins.registry import Registry

from .conftest import PIXEL_UNET, SD_SIZE

CTX = BuildContext()


def same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return True


def build(kind, **options):
    return MODEL_FACTORIES[kind](CTX, **options)


def test_kinds_are_registered():
    reg = Registry(load_entry_points=False)
    assert {"diffusers-pixel", "stable-diffusion"} <= set(reg.names("model"))
    assert reg.get("model", "stable-diffusion").factory is MODEL_FACTORIES["stable-diffusion"]
    with pytest.raises(Exception):
        reg.get("model", "diffusers-pixel").options(not_an_option=1)


def test_pixel_round_trip_matches_the_saved_unet(pixel_dir):
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(pixel_dir / "unet")
    model = build("diffusers-pixel", id=str(pixel_dir))
    assert model.sample_shape == (3, 8, 8)
    sched = DDPMScheduler.from_pretrained(pixel_dir / "scheduler")
    torch.testing.assert_close(model.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert same(model.eps(x, 321), unet(x, 321).sample)
    assert model.eps(x, 321).dtype == torch.float32


def test_pixel_flat_and_bare_layouts(pixel_dir, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(pixel_dir / "unet", flat)
    shutil.copy(pixel_dir / "scheduler" / "scheduler_config.json", flat)
    bare = tmp_path / "bare"
    shutil.copytree(pixel_dir / "unet", bare)
    x = torch.randn(1, 3, 8, 8)
    ref = build("diffusers-pixel", path=str(pixel_dir))
    for model in (build("diffusers-pixel", id=str(flat)),
                  build("diffusers-pixel", id=str(bare), beta_schedule="linear", beta_start=1e-4, beta_end=0.02)):
        with torch.no_grad():
            assert torch.equal(model.eps(x, 10), ref.eps(x, 10))
        assert torch.equal(model.alphas_cumprod, ref.alphas_cumprod)
    other = build("diffusers-pixel", id=str(bare), beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert not torch.equal(other.alphas_cumprod, ref.alphas_cumprod)


def test_pixel_single_file_checkpoint_loads_safely(pixel_dir, tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(5)
    other = UNet2DModel(**PIXEL_UNET)
    ckpt = tmp_path / "unet.ckpt"
    torch.save({"state_dict": other.state_dict()}, ckpt)  # Lightning-style wrapper, tensors only
    model = build("diffusers-pixel", id=str(pixel_dir), checkpoint=str(ckpt))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert same(model.eps(x, 100), other(x, 100).sample)

    class Payload:  # an arbitrary pickled object: weights_only refuses it
        def __reduce__(self):
            return (print, ("unpickled!",))

    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": other.state_dict(), "x": Payload()}, bad)
    with pytest.raises(InputError, match="weights_only"):  # the file exists but is not plain tensors
        build("diffusers-pixel", id=str(pixel_dir), checkpoint=str(bad))
    with pytest.raises(ConfigError):
        build("diffusers-pixel", id=str(pixel_dir), checkpoint=str(tmp_path / "x.onnx"))


def test_pixel_half_precision_weights_keep_float32_maths(pixel_dir):
    ref = build("diffusers-pixel", id=str(pixel_dir))
    half = build("diffusers-pixel", id=str(pixel_dir), dtype="bfloat16")
    assert next(half.unet.parameters()).dtype == torch.bfloat16
    assert half.alphas_cumprod.dtype == torch.float64
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        e_ref, e_half = ref.eps(x, 500), half.eps(x, 500)
    assert e_half.dtype == torch.float32
    assert (e_half - e_ref).abs().max() < 0.05 * e_ref.abs().max() + 1e-3


def test_stable_diffusion_round_trip(sd_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = build("stable-diffusion", id=str(sd_dir), prompt="a red cat", height=SD_SIZE, width=SD_SIZE)
    assert model.sample_shape == (4, SD_SIZE // 2, SD_SIZE // 2)
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    vae = AutoencoderKL.from_pretrained(sd_dir / "vae")
    tok = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    te = CLIPTextModel.from_pretrained(sd_dir / "text_encoder")
    sched = DDIMScheduler.from_pretrained(sd_dir / "scheduler")
    torch.testing.assert_close(model.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        emb = [te(tok([p], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
               for p in ("", "a red cat")]
        x = torch.randn(2, *model.sample_shape)
        assert same(model.eps(x, 400), unet(x, 400, encoder_hidden_states=emb[0].expand(2, -1, -1)).sample)
        assert same(model.eps_cond(x, 400), unet(x, 400, encoder_hidden_states=emb[1].expand(2, -1, -1)).sample)
        assert same(model.decode(x), vae.decode(x / vae.config.scaling_factor).sample)
        img = model.decode(x).clamp(-1, 1)
        assert model.encode(img).shape == x.shape
    conds = model.model_conditions()
    assert len(conds) == 1 and conds[0].name == "prompt"
    assert build("stable-diffusion", id=str(sd_dir), height=SD_SIZE, width=SD_SIZE).model_conditions() == []


def test_decode_size_reduces_guidance_decodes_only(sd_dir):
    model = build("stable-diffusion", id=str(sd_dir), height=32, width=32, decode_size=16)
    x = torch.randn(1, *model.sample_shape)
    with torch.enable_grad():
        assert model.decode(x).shape[-1] == 16
    with torch.no_grad():
        assert model.decode(x).shape[-1] == 32


def test_missing_weights_error_is_clear_and_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    for kind in ("diffusers-pixel", "stable-diffusion"):
        with pytest.raises(WeightsNotFoundError) as info:
            build(kind, id="zmagic-tests/no-such-model")
        msg = str(info.value)
        assert "zmagic-tests/no-such-model" in msg
        assert "models--zmagic-tests--no-such-model" in msg  # where it was looked for
        assert "huggingface-cli download zmagic-tests/no-such-model" in msg  # how to get it
        assert info.value.__cause__ is None
        assert info.value.__context__ is None or info.value.__suppress_context__  # no hub traceback
    assert time.time() - start < 5  # no network retries
    with pytest.raises(WeightsNotFoundError, match="not found"):
        build("diffusers-pixel", path="/nonexistent/zmagic/folder")


def test_default_ids_name_themselves_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="google/ddpm-ema-celebahq-256"):
        build("diffusers-pixel")
    with pytest.raises(WeightsNotFoundError, match="CompVis/stable-diffusion-v1-4"):
        build("stable-diffusion", prompt="x")


def test_broken_local_folder_is_a_weights_error(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="UNet2DModel"):
        build("diffusers-pixel", id=str(tmp_path))


def test_recipes_count_the_prompt_as_a_condition(sd_dir):
    from zmagic_core.assembly.build import load_recipe

    reg = Registry(load_entry_points=False)
    recipe = {"model": {"kind": "stable-diffusion", "path": str(sd_dir), "prompt": "a cat", "height": SD_SIZE,
                        "width": SD_SIZE},
              "combiner": {"kind": "dependent", "hessian": True},
              "conditions": [{"kind": "shapes-style", "reference": "red circle center"}]}
    load_recipe(recipe, registry=reg)  # prompt + one energy = the two conditions Algorithm 1 takes
    del recipe["model"]["prompt"]
    with pytest.raises(ConfigError, match="conditions"):
        load_recipe(recipe, registry=reg)
    with pytest.raises(ConfigError, match="decode_size"):
        load_recipe({"model": {"kind": "stable-diffusion", "decode_size": 100}}, registry=reg)


@pytest.mark.parametrize("name", ["celebahq_low_memory", "sd_text_style", "sd_text_style_low_memory"])
def test_example_recipes_parse(name):
    from pathlib import Path

    from zmagic_core.assembly.build import load_recipe

    path = Path(__file__).resolve().parents[3] / "examples" / "models" / f"{name}.yaml"
    recipe = load_recipe(path, check=False)
    reg = Registry(load_entry_points=False)
    reg.get("model", recipe.model.kind).options(**recipe.model.options)  # options valid for the kind
    reg.get("combiner", recipe.combiner.kind).options(**recipe.combiner.options)


def test_unreachable_hub_fails_at_once(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.time()
    with pytest.raises(WeightsNotFoundError, match="cannot be reached") as info:
        build("diffusers-pixel", id="zmagic-tests/no-such-model")
    assert "huggingface-cli download zmagic-tests/no-such-model" in str(info.value)
    assert time.time() - start < 5


def test_a_missing_tokenizer_a_missing_schedule_and_a_file_as_id_are_named(sd_dir, pixel_dir, tmp_path):
    sd = tmp_path / "sd"
    shutil.copytree(sd_dir, sd)
    shutil.rmtree(sd / "tokenizer")
    with pytest.raises(WeightsNotFoundError, match="has no tokenizer/"):
        build("stable-diffusion", id=str(sd), prompt="a cat", height=SD_SIZE, width=SD_SIZE)
    # a schedule is never guessed: a misspelt subfolder, or a folder with none and no schedule options
    with pytest.raises(ConfigError, match="no scheduler_config.json in scheduler_subfolder 'schedulr'"):
        build("diffusers-pixel", path=str(pixel_dir), scheduler_subfolder="schedulr")
    bare = tmp_path / "bare"
    shutil.copytree(pixel_dir / "unet", bare)
    with pytest.raises(ConfigError, match="the noise schedule is unknown"):
        build("diffusers-pixel", id=str(bare))
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file; .id. names a save_pretrained folder or a hub id"):
        build("diffusers-pixel", id=str(weights))


def test_a_schedule_with_betas_outside_0_1_is_refused(pixel_dir):
    with pytest.raises(ConfigError, match=r"betas must lie in \(0, 1\).*beta_end 1.5"):
        build("diffusers-pixel", path=str(pixel_dir), beta_end=1.5)


def test_a_unet_that_cannot_sample_here_is_named_before_any_step(sd_dir, pixel_dir, tmp_path):
    import json

    inpaint = tmp_path / "inpaint"
    shutil.copytree(sd_dir, inpaint)
    from diffusers import UNet2DConditionModel

    config = json.loads((inpaint / "unet" / "config.json").read_text())
    UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")} | {"in_channels": 9}
                         ).save_pretrained(inpaint / "unet")
    with pytest.raises(ConfigError, match="takes 9 channels and the VAE's latents have 4"):
        build("stable-diffusion", id=str(inpaint), prompt="a cat", height=SD_SIZE, width=SD_SIZE)
    with pytest.raises(ConfigError, match="sample_size: 9 is not a multiple of 2"):
        build("diffusers-pixel", path=str(pixel_dir), sample_size=9)
    from diffusers import UNet2DModel

    labelled = tmp_path / "labelled"
    shutil.copytree(pixel_dir, labelled)
    UNet2DModel(**PIXEL_UNET, num_class_embeds=10).save_pretrained(labelled / "unet")
    with pytest.raises(ConfigError, match="is class-conditional"):
        build("diffusers-pixel", path=str(labelled))
