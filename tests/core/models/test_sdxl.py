"""Model kind ``stable-diffusion-xl`` on a tiny SDXL saved in the real diffusers layout: the same eps
and classifier-free guidance as diffusers' StableDiffusionXLPipeline, and guided runs under every combiner."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zmagic_core.contracts.components import BuildContext
from zmagic_core.contracts.errors import ConfigError
from zmagic_core.method.combiners import CAGradCombiner, DependentCombiner, SumCombiner
from zmagic_core.method.guidance import Condition
from zmagic_core.method.solvers import DDIMSolver
from zmagic_core.models.pretrained import MODEL_FACTORIES
from zmagic_core.plugins.registry import Registry
from zmagic_core.sampling.pipeline import Pipeline

from .conftest import SD_SIZE, SD_VAE, ColorEnergy, GramEnergy, reference_image, tame, write_clip_tokenizer

TEXT_WIDTH = 8  # hidden size of each tiny text encoder: the UNet's cross attention sees 2 * 8
TIME_DIM = 4    # addition_time_embed_dim: 6 time ids * 4 + the pooled projection (8) = 32 features
SDXL_UNET = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=2,
                 cross_attention_dim=2 * TEXT_WIDTH, addition_embed_type="text_time",
                 addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=6 * TIME_DIM + TEXT_WIDTH)
# leading spacing, no offset, final abar 1: diffusers' DDIM visits the timesteps zmagic's schedule visits
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", num_train_timesteps=1000)
COMBINERS = {"sum": SumCombiner, "dependent": lambda: DependentCombiner(hessian=True),
             "cagrad": lambda: CAGradCombiner(c=0.5)}


def save_tiny_sdxl(root: Path, bpe: Path) -> Path:
    """A StableDiffusionXLPipeline of tiny random parts, written by its own save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    raw, bos = write_clip_tokenizer(bpe)
    config = CLIPTextConfig(bos_token_id=bos, eos_token_id=bos + 1, hidden_size=TEXT_WIDTH, intermediate_size=16,
                            layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=3, pad_token_id=bos + 1,
                            vocab_size=bos + 2, projection_dim=TEXT_WIDTH)
    tokenizer = CLIPTokenizer.from_pretrained(str(raw), model_max_length=77)
    StableDiffusionXLPipeline(vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(config),
                              text_encoder_2=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=UNet2DConditionModel(**SDXL_UNET),
                              scheduler=DDIMScheduler(**SDXL_SCHEDULER), add_watermarker=False).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl"), tmp_path_factory.mktemp("bpe-xl"))


def build(**options):
    return MODEL_FACTORIES["stable-diffusion-xl"](BuildContext(), **{"height": SD_SIZE, "width": SD_SIZE, **options})


def test_kind_is_registered_with_sdxl_defaults():
    reg = Registry(load_entry_points=False)
    registration = reg.get("model", "stable-diffusion-xl")
    defaults = registration.options()
    assert defaults.id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (defaults.height, defaults.width) == (1024, 1024)
    assert registration.adds_conditions({"prompt": "a cat"}) == 1 and registration.adds_conditions({}) == 0
    with pytest.raises(Exception, match="multiple of 8"):
        registration.options(height=1001)


def test_layout_and_text_inputs(sdxl_dir):
    model = build(id=str(sdxl_dir), prompt="a red cat")
    assert model.sample_shape == (4, SD_SIZE // 2, SD_SIZE // 2)
    assert model.cond_embedding.shape == (1, 77, 2 * TEXT_WIDTH) and model.cond_pooled.shape == (1, TEXT_WIDTH)
    assert model.time_ids.tolist() == [[SD_SIZE, SD_SIZE, 0, 0, SD_SIZE, SD_SIZE]]
    assert torch.count_nonzero(model.uncond_embedding) == 0  # force_zeros_for_empty_prompt, as the pipeline
    crop = build(id=str(sdxl_dir), prompt="x", original_size=(64, 48), crops_coords_top_left=(8, 4))
    assert crop.time_ids.tolist() == [[64, 48, 8, 4, SD_SIZE, SD_SIZE]]
    assert [c.name for c in model.model_conditions()] == ["prompt"]


def _diffusers_run(sdxl_dir, prompt, negative, guidance, steps, seed):
    """Latents of diffusers' own pipeline, and every (latent input, t, noise prediction) its UNet saw."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    seen = []
    pipe.unet.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0], int(args[1]), out[0])),
                                    with_kwargs=True)
    with torch.no_grad():
        latents = pipe(prompt, negative_prompt=negative, guidance_scale=guidance, num_inference_steps=steps,
                       height=SD_SIZE, width=SD_SIZE, output_type="latent",
                       generator=torch.Generator().manual_seed(seed)).images
    return latents, seen


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_eps_and_guidance_match_diffusers_sdxl_pipeline(sdxl_dir, negative):
    w, steps, seed = 5.0, 2, 3
    latents, seen = _diffusers_run(sdxl_dir, "a red cat", negative, w, steps, seed)
    model = build(id=str(sdxl_dir), prompt="a red cat", negative_prompt=negative, guidance_scale=w)
    x, t, out = seen[0]  # CFG batch: negative branch first, then the prompt's
    assert t == 500
    with torch.no_grad():
        eps_u, eps_c = model.eps(x[:1], t), model.eps_cond(x[:1], t)
    torch.testing.assert_close(eps_u, out[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eps_c, out[1:], rtol=1e-5, atol=1e-6)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the prompt changes the prediction: the check is not vacuous
    # the whole run: the prompt condition under `sum` with DDIM is classifier-free guidance
    run = Pipeline(model, DDIMSolver(0.0), SumCombiner(), [], steps=steps).run([seed], progress=False)
    torch.testing.assert_close(run.samples, latents, rtol=1e-4, atol=1e-5)


def test_with_prompt_shares_the_networks(sdxl_dir):
    model = build(id=str(sdxl_dir), prompt="a red cat", keep_text_encoder=True)
    other = model.with_prompt("the stair", "blurry", guidance_scale=2.0)
    assert other.unet is model.unet and other.guidance_scale == 2.0 and model.guidance_scale == 7.5
    fresh = build(id=str(sdxl_dir), prompt="the stair", negative_prompt="blurry")
    for key in ("cond_embedding", "cond_pooled", "uncond_embedding", "uncond_pooled"):
        torch.testing.assert_close(getattr(other, key), getattr(fresh, key))
    assert not torch.equal(model.cond_embedding, other.cond_embedding)
    with pytest.raises(ConfigError, match="keep_text_encoder"):
        fresh.with_prompt("x")


def test_fp16_keeps_the_vae_in_float32_unless_fixed(sdxl_dir, tmp_path):
    from diffusers import AutoencoderKL

    half = build(id=str(sdxl_dir), prompt="x", dtype="float16")
    assert half.weight_dtype == torch.float16 and next(half.vae.parameters()).dtype == torch.float32
    fixed = AutoencoderKL.from_pretrained(sdxl_dir / "vae")
    fixed.register_to_config(force_upcast=False)
    fixed.save_pretrained(tmp_path / "fixed-vae")
    model = build(id=str(sdxl_dir), prompt="x", dtype="float16", vae=str(tmp_path / "fixed-vae"))
    assert next(model.vae.parameters()).dtype == torch.float16


def test_a_mismatched_text_encoder_is_one_clear_error(sdxl_dir, tmp_path):
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    broken = tmp_path / "broken"
    shutil.copytree(sdxl_dir, broken)
    config = CLIPTextConfig.from_pretrained(sdxl_dir / "text_encoder_2")
    config.projection_dim = 2 * TEXT_WIDTH
    shutil.rmtree(broken / "text_encoder_2")
    CLIPTextModelWithProjection(config).save_pretrained(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match="added embedding takes 32 features"):
        build(id=str(broken), prompt="x")


@pytest.fixture(scope="module")
def sdxl_model(sdxl_dir):
    return tame(build(id=str(sdxl_dir), prompt="a striped painting", guidance_scale=3.0))


@pytest.mark.parametrize("combiner", list(COMBINERS))
def test_every_combiner_runs_with_a_second_condition(sdxl_model, combiner):
    energy = GramEnergy(reference_image(SD_SIZE))
    conds = [Condition("style", energy, "adaptive", 0.5)]
    base = Pipeline(sdxl_model, DDIMSolver(0.0), SumCombiner(), [], steps=6).run([0, 1], batch_size=2, progress=False)
    run = Pipeline(sdxl_model, DDIMSolver(0.0), COMBINERS[combiner](), conds, steps=6).run([0, 1], batch_size=2,
                                                                                          progress=False)
    assert run.condition_names == ["prompt", "style"] and not run.errors
    assert run.images.shape == (2, 3, SD_SIZE, SD_SIZE) and torch.isfinite(run.images).all()
    assert all(torch.isfinite(torch.tensor(rec["guidance_norm"])) for rec in run.trace[0])
    with torch.no_grad():
        assert energy(run.images).mean() < energy(base.images).mean()
    if combiner != "sum":  # three conditions: only cagrad takes them
        three = conds + [Condition("color", ColorEnergy(), "adaptive", 0.5)]
        if combiner == "cagrad":
            out = Pipeline(sdxl_model, DDIMSolver(0.0), COMBINERS[combiner](), three, steps=2).run([0], progress=False)
            assert torch.isfinite(out.images).all() and not out.errors
        else:
            with pytest.raises(ConfigError):
                Pipeline(sdxl_model, DDIMSolver(0.0), COMBINERS[combiner](), three, steps=2)


def test_example_recipe_parses():
    from zmagic_core.assembly.build import load_recipe

    path = Path(__file__).resolve().parents[3] / "examples" / "models" / "sdxl_text_style.yaml"
    recipe = load_recipe(path, check=False)
    assert recipe.model.kind == "stable-diffusion-xl" and recipe.dtype == "float16"
    options = Registry(load_entry_points=False).get("model", recipe.model.kind).options(**recipe.model.options)
    assert options.id == "stabilityai/stable-diffusion-xl-base-1.0" and options.decode_size == 512
    assert [c.kind for c in recipe.conditions] == ["style"] and recipe.combiner.kind == "dependent"


def test_a_folder_of_the_other_family_is_named_before_any_step(sdxl_dir, sd_dir):
    from zmagic_core.contracts.errors import ConfigError

    with pytest.raises(ConfigError, match="holds an SDXL UNet; use model kind 'stable-diffusion-xl'"):
        MODEL_FACTORIES["stable-diffusion"](BuildContext(), id=str(sdxl_dir), height=SD_SIZE, width=SD_SIZE)
    with pytest.raises(ConfigError, match="holds a Stable Diffusion 1.x/2.x UNet; use model kind 'stable-diffusion'"):
        build(id=str(sd_dir))
