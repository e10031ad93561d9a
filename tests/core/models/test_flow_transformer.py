"""The ``flow-transformer`` kind on tiny SD3 and FLUX pipelines saved in the real folder layouts:
one step against the diffusers pipelines' own transformer calls, whole trajectories against
FlowMatchEulerDiscreteScheduler, every combiner end to end."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from zmagic_core.contracts.components import BuildContext
from zmagic_core.contracts.errors import ConfigError
from zmagic_core.method.combiners import CAGradCombiner, DependentCombiner, SumCombiner
from zmagic_core.method.flow import vp_scale
from zmagic_core.method.guidance import Condition, evaluate
from zmagic_core.method.solvers import DDIMSolver, DDPMSolver
from zmagic_core.models.pretrained import MODEL_FACTORIES
from zmagic_core.models.pretrained.flow_transformer import pack_latents, unpack_latents
from zmagic_core.sampling.pipeline import Pipeline, SampleNoise

from .conftest import write_clip_tokenizer

SIZE = 16  # image side: latents (4, 8, 8) (the tiny VAE downsamples by 2); FLUX packs them to 16 tokens
TOKENS = 16  # T5 tokens of a prompt (the pipelines' max_sequence_length)
PROMPT = "a red cat"
VAE = dict(block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2, shift_factor=0.1,
           scaling_factor=1.3, use_quant_conv=False, use_post_quant_conv=False)


def t5_parts(d_model: int):
    """A tiny T5 encoder and a T5 tokenizer with a Unigram vocabulary of single letters (offline)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in letters]
             + [("\u2581" + c, -3.5) for c in letters])
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=d_model, d_ff=16, d_kv=4, num_layers=1, num_heads=2,
                                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return encoder, T5TokenizerFast(vocab=vocab, extra_ids=0)


def clip_parts(tmp: Path, cls_name: str):
    import transformers
    from transformers import CLIPTextConfig, CLIPTokenizer

    raw, bos = write_clip_tokenizer(tmp)
    config = CLIPTextConfig(bos_token_id=bos, eos_token_id=bos + 1, hidden_size=8, intermediate_size=16,
                            layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2, pad_token_id=bos + 1,
                            vocab_size=bos + 2, projection_dim=8)
    return getattr(transformers, cls_name)(config), CLIPTokenizer.from_pretrained(str(raw), model_max_length=77)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    """StableDiffusion3Pipeline.save_pretrained of tiny parts (CLIP-L, CLIP-G with projection, T5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    clip_l, tok = clip_parts(tmp_path_factory.mktemp("bpe"), "CLIPTextModelWithProjection")
    clip_g, _ = clip_parts(tmp_path_factory.mktemp("bpe"), "CLIPTextModelWithProjection")
    t5, t5_tok = t5_parts(16)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                        pooled_projection_dim=16, out_channels=4)
    root = tmp_path_factory.mktemp("sd3")
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=AutoencoderKL(**VAE), text_encoder=clip_l, tokenizer=tok, text_encoder_2=clip_g,
                             tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=t5_tok).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    """FluxPipeline.save_pretrained of tiny parts (CLIP-L pooled, T5, guidance embedding, dynamic shift)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    clip, tok = clip_parts(tmp_path_factory.mktemp("bpe"), "CLIPTextModel")
    t5, t5_tok = t5_parts(8)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                         pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=[2, 2, 4])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    root = tmp_path_factory.mktemp("flux")
    FluxPipeline(scheduler=scheduler, vae=AutoencoderKL(**VAE), text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                 tokenizer_2=t5_tok, transformer=transformer).save_pretrained(root)
    return root


FAMILIES = {"sd3": dict(guidance_scale=3.0), "flux": dict(guidance_scale=4.0)}


@pytest.fixture(scope="module")
def dirs(sd3_dir, flux_dir):
    return {"sd3": sd3_dir, "flux": flux_dir}


def build(folder, **options):
    return MODEL_FACTORIES["flow-transformer"](BuildContext(), id=str(folder), height=SIZE, width=SIZE,
                                               max_sequence_length=TOKENS, **options)


def diffusers_pipeline(family, folder):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family].from_pretrained(folder)


def reference_latents(family, folder, latents: torch.Tensor, unshifted_sigmas: list[float]) -> torch.Tensor:
    """The diffusers pipeline's own denoising loop from ``latents`` (flow coordinates) through the
    given (unshifted) sigmas: the scheduler shifts them as the pipeline does, then Euler to sigma 0."""
    pipe = diffusers_pipeline(family, folder)
    kw = dict(prompt=PROMPT, height=SIZE, width=SIZE, sigmas=unshifted_sigmas, output_type="latent",
              max_sequence_length=TOKENS, **FAMILIES[family])
    if family == "flux":
        out = pipe(latents=pack_latents(latents), **kw).images
        return unpack_latents(out, *latents.shape[-2:])
    return pipe(latents=latents, negative_prompt="", **kw).images


def unshifted(model, t: int) -> float:
    return (t + 1) / model.num_train_timesteps


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_family_is_detected_and_the_prompt_is_the_first_condition(dirs, family):
    model = build(dirs[family], prompt=PROMPT, **FAMILIES[family])
    assert model.family == family and model.sample_shape == (4, SIZE // 2, SIZE // 2)
    (prompt,) = model.model_conditions()
    assert prompt.name == "prompt" and prompt.rule == ("cfg" if family == "sd3" else "distilled")
    assert build(dirs[family], family=family).model_conditions() == []
    # FLUX-dev's guidance-distilled default; the pipeline's true CFG makes the prompt a CFG condition
    assert (model.embedded_guidance is not None) == (family == "flux")
    if family == "flux":
        assert build(dirs[family], prompt=PROMPT, true_cfg_scale=2.0).model_conditions()[0].rule == "cfg"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guided_velocity_at_one_step_matches_the_pipeline(dirs, family):
    """Base score + the prompt condition's g -> velocity, against the pipeline's CFG-combined (SD3)
    or guidance-embedded (FLUX) velocity at the same point and level."""
    model = build(dirs[family], prompt=PROMPT, **FAMILIES[family])
    t = 600
    sigma, abar = model.sigma(t), float(model.alphas_cumprod[t])
    x_flow = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(3))
    ev = evaluate(model, x_flow * vp_scale(sigma), t, abar, model.model_conditions(), [True])
    eps = -math.sqrt(1.0 - abar) * (ev.score + ev.grads[0]).detach()
    ours = (eps - x_flow) / (1.0 - sigma)
    after = reference_latents(family, dirs[family], x_flow, [unshifted(model, t)])  # x_s - s v
    theirs = (x_flow - after) / sigma
    assert ours.abs().max() > 0.1  # not vacuous
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_ddim_trajectory_is_the_flow_match_euler_trajectory(dirs, family):
    """The sampler (DDIM, no energies) against FlowMatchEulerDiscreteScheduler at the sampler's levels
    (our strided grid s = shift((t + 1) / T), given to the pipeline as its sigmas), same noise."""
    model = build(dirs[family], prompt=PROMPT, **FAMILIES[family])
    pipeline = Pipeline(model, DDIMSolver(), SumCombiner(), [], steps=4)
    result = pipeline.run([7], progress=False)
    start = SampleNoise([7], tuple(model.sample_shape), torch.device("cpu")).draw()  # the run's x_T
    t0 = pipeline.schedule.timesteps[0]
    sigmas = [unshifted(model, t) for t in pipeline.schedule.timesteps]
    theirs = reference_latents(family, dirs[family], start / vp_scale(model.sigma(t0)), sigmas)
    torch.testing.assert_close(result.samples, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the images are the VAE's decode of latents / scaling_factor + shift_factor
        vae = model.vae
        images = vae.decode(theirs / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(result.images, images, rtol=1e-5, atol=1e-5)


def test_dynamic_shift_is_the_pipelines(dirs):
    """FLUX's mu from the token count, as FluxPipeline's calculate_shift computes it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from zmagic_core.method.flow import flow_alphas_cumprod

    model = build(dirs["flux"])
    mu = calculate_shift((SIZE // 4) ** 2, 256, 4096, 0.5, 1.15)
    torch.testing.assert_close(model.alphas_cumprod, flow_alphas_cumprod(1000, mu=mu))
    assert not torch.allclose(build(dirs["flux"], mu=0.0).alphas_cumprod, model.alphas_cumprod)


class MeanColour(torch.nn.Module):
    """A tiny image-statistics energy: distance of the mean colour to a target colour."""

    def forward(self, images):
        return (images.mean(dim=(2, 3)) - torch.tensor([0.5, -0.3, 0.1])).norm(dim=1)


COMBINERS = [SumCombiner(), DependentCombiner(), CAGradCombiner(),
             DependentCombiner(product="autograd", bound="none")]


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("combiner", COMBINERS, ids=["sum", "dependent", "cagrad", "dependent-autograd"])
def test_every_combiner_runs_with_the_prompt_and_an_energy(dirs, family, combiner):
    model = build(dirs[family], prompt=PROMPT, **FAMILIES[family])
    colour = Condition("colour", MeanColour(), rule="adaptive", scale=0.3)
    result = Pipeline(model, DDPMSolver(), combiner, [colour], steps=3).run([0, 1], progress=False)
    assert not result.errors and result.condition_names == ["prompt", "colour"]
    assert torch.isfinite(result.samples).all() and torch.isfinite(result.images).all()
    trace = result.trace[0]
    assert all(math.isfinite(r["energy"]["colour"]) for r in trace) and trace[0]["guidance_norm"] > 0


def test_cfg_clean_estimate_is_the_cfg_velocitys(dirs):
    """clean_estimate cfg: x0 = x_s - s v_cfg, and the prompt condition reuses the same pass."""
    model = build(dirs["sd3"], prompt=PROMPT, guidance_scale=3.0, clean_estimate="cfg")
    t, x_flow = 500, torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    sigma = model.sigma(t)
    with torch.enable_grad():
        prediction = model.predict(x_flow * vp_scale(sigma), t)
    v_u = model.branch_velocity(x_flow, sigma, "uncond")
    v_c = model.branch_velocity(x_flow, sigma, "cond")
    torch.testing.assert_close(prediction.x0.detach(), x_flow - sigma * (v_u + 3.0 * (v_c - v_u)), rtol=1e-5, atol=1e-5)
    assert "eps_cond" in prediction.extras


def test_with_prompt_equals_a_fresh_build(dirs):
    kept = build(dirs["flux"], prompt=PROMPT, keep_text_encoder=True)
    other = kept.with_prompt("a blue dog", guidance_scale=2.0)
    fresh = build(dirs["flux"], prompt="a blue dog", guidance_scale=2.0)
    x, t = torch.randn(1, *kept.sample_shape), 300
    with torch.no_grad():
        torch.testing.assert_close(other.eps(x, t), fresh.eps(x, t))
        assert not torch.allclose(kept.eps(x, t), fresh.eps(x, t))
    with pytest.raises(ConfigError, match="keep_text_encoder"):
        fresh.with_prompt("x")


def test_bad_folders_and_schedules_are_one_line_errors(tmp_path):
    from diffusers import AutoencoderKL
    from zmagic_core.models.pretrained.flow_transformer import flow_schedule

    AutoencoderKL(**VAE).save_pretrained(tmp_path / "vae")
    with pytest.raises(ConfigError, match="not an SD3 or FLUX pipeline.*give family"):
        build(tmp_path)
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        flow_schedule({"shift": 3.0, "use_karras_sigmas": True}, "sd3", 16)


def test_flux_faceid_example_parses():
    from zmagic_core.assembly.build import load_recipe
    from zmagic_core.plugins.registry import Registry

    path = Path(__file__).resolve().parents[3] / "examples" / "models" / "flux_text_faceid.yaml"
    recipe = load_recipe(path, check=False)
    reg = Registry(load_entry_points=False)
    options = reg.get("model", recipe.model.kind).options(**recipe.model.options)
    assert options.id == "black-forest-labs/FLUX.1-dev" and options.dtype == "bfloat16"
    reg.get("combiner", recipe.combiner.kind).options(**recipe.combiner.options)
    assert recipe.combiner.kind == "dependent" and [c.kind for c in recipe.conditions] == ["faceid"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_from_pipe_reuses_a_loaded_pipeline_and_matches_from_pretrained(dirs, family):
    """ZMagicPipeline.from_pipe on a diffusers SD3 / FLUX pipeline object: its own transformer is used
    (not copied) and the images equal those of from_pretrained on the same folder."""
    from zmagic_core import ZMagicPipeline

    loaded = diffusers_pipeline(family, dirs[family])
    options = dict(height=SIZE, width=SIZE, max_sequence_length=TOKENS, **FAMILIES[family])
    mine = ZMagicPipeline.from_pipe(loaded, **options)
    assert mine.kind == "flow-transformer" and mine.model.transformer is loaded.transformer
    fresh = ZMagicPipeline.from_pretrained(str(dirs[family]), device="cpu", **options)
    a = mine(prompt=PROMPT, combiner="sum", steps=3, seeds=[0], progress=False)
    b = fresh(prompt=PROMPT, combiner="sum", steps=3, seeds=[0], progress=False)
    assert a.images[0].size == (SIZE, SIZE)
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="from_pipe reuses"):
        ZMagicPipeline.from_pipe(loaded, t5=False)


@pytest.mark.parametrize("family,tokenizer", [("sd3", "tokenizer_3"), ("flux", "tokenizer_2"), ("flux", "tokenizer")])
def test_a_folder_missing_a_tokenizer_is_refused_naming_it(dirs, tmp_path, family, tokenizer):
    """transformers builds an empty default tokenizer for a missing folder (T5 then encodes every prompt as
    unknown tokens, silently): the loader refuses the folder first."""
    import shutil

    from zmagic_core.contracts.errors import WeightsNotFoundError

    folder = tmp_path / family
    shutil.copytree(dirs[family], folder)
    shutil.rmtree(folder / tokenizer)
    with pytest.raises(WeightsNotFoundError, match=f"has no {tokenizer}/ .tokenizer_config.json.; the prompt cannot"):
        build(folder)


def test_t5_off_is_refused_on_flux(dirs):
    from zmagic_core.contracts.errors import ConfigError

    with pytest.raises(ConfigError, match="t5: false is for sd3 only"):
        build(dirs["flux"], t5=False)


@pytest.mark.parametrize("family,other", [("sd3", "flux"), ("flux", "sd3")])
def test_a_family_the_folder_contradicts_is_refused_naming_both(dirs, family, other):
    from zmagic_core.contracts.errors import ConfigError

    with pytest.raises(ConfigError, match=f"family: {other}, but .* is a {family} pipeline .*model_index.json.*give "
                                          f"family: {family}"):
        build(dirs[family], family=other)


def test_a_family_the_transformer_config_contradicts_is_refused(dirs, tmp_path):
    import shutil

    from zmagic_core.contracts.errors import ConfigError

    folder = tmp_path / "no-index"
    shutil.copytree(dirs["flux"], folder)
    (folder / "model_index.json").unlink()  # only the transformer's config says which family it is
    with pytest.raises(ConfigError, match="family: sd3, but .* is a flux pipeline .*transformer/config.json names "
                                          "FluxTransformer2DModel"):
        build(folder, family="sd3")
