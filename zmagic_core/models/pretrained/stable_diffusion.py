"""Model kind ``stable-diffusion``: a latent text-to-image model (UNet2DConditionModel + AutoencoderKL
+ CLIP text encoder) with the prompt as the first condition p(x_t | c1) of the paper.

Choices (METHOD.md sections 1, 2 and 4):

* ``eps(x_t, t)`` returns the *unconditional* prediction (the negative prompt's; "" by default), so
  the base score s(x_t) is the unconditional score and the prompt condition adds
  g_prompt = w (s_cond - s_uncond).  Under ``sum`` that gives exactly the classifier-free guidance
  score s_uncond + w (s_cond - s_uncond); under ``dependent`` the prompt is c1 and a plugin energy
  c2 is evaluated at x_hat = Phi_t(x_t, s + g_prompt), the point the CFG step would reach.
* Energies see decode(x0|t) with x0|t the Tweedie estimate of that unconditional eps (the same
  clean estimate for every condition, as in METHOD.md section 1).  FreeDoM's SD style code decodes
  the CFG estimate instead; here the prompt's pull on the second energy enters through the
  dependent combiner's x_hat, which is the paper's point.  Option ``clean_estimate="cfg"``
  gives FreeDoM's choice (see StableDiffusionModel.predict).
* x_t is the latent (4, H/8, W/8) in the scaled space (VAE latents times ``scaling_factor``);
  decode divides by it and runs the VAE decoder, giving images in [-1, 1].
* The unconditional and conditional passes run separately (not as one batch of 2B): an energy's
  gradient then backpropagates through the unconditional pass only, half the work of a 2B batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from zmagic_core.contracts.components import BuildContext, DiffusionModel, Prediction
from zmagic_core.contracts.errors import ConfigError
from zmagic_core.contracts.options import FilePath, PathOrName
from zmagic_core.method.guidance import Condition, rms
from zmagic_core.models.pretrained.attention import ATTENTION_POLICIES, attention_context, checkpoint_function
from zmagic_core.method.predictions import PREDICTION_TYPES, alphas_cumprod_from_config, output_to_eps, tweedie_x0
from zmagic_core.models.pretrained.loading import (DIFFUSERS_AND_TRANSFORMERS, fp32, load_pretrained, load_checkpoint_into,
                                                  parse_dtype, read_scheduler_config, require_modules, resolve_device,
                                                  resolve_source)

DEFAULT_SD_ID = "CompVis/stable-diffusion-v1-4"


@dataclass
class PromptCondition(Condition):
    """The content condition c1: g = w (s_cond - s_uncond) at ev.x, s = -eps / sqrt(1 - abar).

    Its "energy" is a diagnostic, not an energy: rms(eps_cond - eps_uncond) per sample, the size
    of the prompt's disagreement with the unconditional model (it shrinks as the sample commits
    to the prompt).  ``rule`` and ``scale`` are informational: the step size is the CFG scale w.
    """

    model: Any = field(default=None, repr=False, compare=False)

    def _eps_cond(self, ev, grad: bool) -> torch.Tensor:
        cached = ev.extras.get("eps_cond")
        if cached is not None:  # computed by predict() for clean_estimate "cfg"
            return cached if grad else cached.detach()
        with torch.set_grad_enabled(grad):
            return self.model.eps_cond(ev.x, max(ev.t, 0))

    def guidance(self, ev, create_graph):
        """g keeps its graph (through both UNet passes) only with ``create_graph``; otherwise the
        conditional pass runs without a graph (no memory held for a backward that never comes)."""
        eps_c = self._eps_cond(ev, create_graph)
        denom = math.sqrt(1.0 - ev.abar) if ev.abar < 1.0 else 1.0
        diff = eps_c - (ev.eps if create_graph else ev.eps.detach())
        g = -self.model.guidance_scale * diff / denom
        return rms(diff), g

    def energy_only(self, ev):
        eps_c = self._eps_cond(ev, False)
        return rms(eps_c - ev.eps)


class StableDiffusionModel(DiffusionModel):
    """Latent eps(x_t, t) with the unconditional (negative-prompt) embedding; see the module doc."""

    def __init__(self, unet, vae, cond_embedding: Optional[torch.Tensor], uncond_embedding: torch.Tensor,
                 alphas_cumprod: torch.Tensor, guidance_scale: float = 7.5, height: int = 512, width: int = 512,
                 prediction_type: str = "epsilon", decode_size: Optional[int] = None, attention: str = "auto",
                 prompt: Optional[str] = None, clean_estimate: str = "uncond"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if attention not in ATTENTION_POLICIES:
            raise ConfigError(f"attention {attention!r}; expected one of {ATTENTION_POLICIES}")
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))
        self.register_buffer("uncond_embedding", uncond_embedding)
        self.register_buffer("cond_embedding", cond_embedding if cond_embedding is not None else None)
        self.guidance_scale, self.prediction_type, self.attention = float(guidance_scale), prediction_type, attention
        self.prompt = prompt
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_factor = factor
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.sample_shape = (int(unet.config.in_channels), height // factor, width // factor)
        self.decode_size = decode_size
        if clean_estimate not in ("uncond", "cfg"):
            raise ConfigError(f"clean_estimate {clean_estimate!r}; expected 'uncond' or 'cfg'")
        self.clean_estimate = clean_estimate
        self._conditions = ([PromptCondition("prompt", None, rule="cfg", scale=self.guidance_scale, model=self)]
                            if cond_embedding is not None else [])

    # -- conditions --------------------------------------------------------------------------
    def model_conditions(self):
        return list(self._conditions)

    # -- network -----------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _unet(self, x: torch.Tensor, t: int, embedding: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        timestep = torch.full((b,), int(t), device=x.device, dtype=torch.long)
        with attention_context(x.device, self.attention):
            out = fp32(self.unet(x.to(self.weight_dtype), timestep, encoder_hidden_states=embedding).sample)
        return out

    def _to_eps(self, out, x, t):
        return output_to_eps(out, fp32(x), float(self.alphas_cumprod[t]), self.prediction_type)

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The unconditional (negative-prompt) prediction; the prompt enters as a condition."""
        return self._to_eps(self._unet(x_t, t, self.uncond_embedding.expand(x_t.shape[0], -1, -1)), x_t, t)

    def predict(self, x_t: torch.Tensor, t: int) -> Prediction:
        """The unconditional eps and the clean estimate the energies see.

        With ``clean_estimate="cfg"`` (grad mode on, a prompt given) the conditional pass runs here
        too: x0 is then the CFG Tweedie estimate, and ``extras["eps_cond"]`` hands the conditional
        prediction to the prompt condition, which reuses it instead of a second pass."""
        a = float(self.alphas_cumprod[t])
        eps_u = self.eps(x_t, t)
        x0 = tweedie_x0(fp32(x_t), eps_u, a)
        if self.clean_estimate == "cfg" and self.cond_embedding is not None and torch.is_grad_enabled():
            eps_c = self.eps_cond(x_t, t)
            # x0_cfg = (x - sqrt(1-a) eps_cfg) / sqrt(a) = x0_uncond - sqrt((1-a)/a) w (eps_c - eps_u)
            x0 = x0 - math.sqrt((1.0 - a) / a) * self.guidance_scale * (eps_c - eps_u)
            return Prediction(eps_u, x0, {"eps_cond": eps_c})
        return Prediction(eps_u, x0)

    def eps_cond(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The conditional (prompt) prediction alone."""
        return self._to_eps(self._unet(x_t, t, self.cond_embedding.expand(x_t.shape[0], -1, -1)), x_t, t)

    def eps_cfg(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """eps_uncond + w (eps_cond - eps_uncond), what a plain CFG sampler uses."""
        eps_u, eps_c = self.eps(x_t, t), self.eps_cond(x_t, t)
        return eps_u + self.guidance_scale * (eps_c - eps_u)

    # -- latents <-> images ------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """VAE decoder output in [-1, 1] (not clamped), float32.

        With ``decode_size`` and grad mode on (guidance passes), the latent is resized to
        decode_size / 8 first, so the decoder runs at reduced resolution; final images (no grad)
        are decoded at full size."""
        z = fp32(x0) / self.scaling_factor + self.shift_factor
        if self.decode_size and torch.is_grad_enabled():
            side = max(self.decode_size // self.vae_factor, 1)
            if (side, side) != tuple(z.shape[-2:]):
                z = F.interpolate(z, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        vae_dtype = next(self.vae.parameters()).dtype
        with attention_context(z.device, self.attention):
            return fp32(self.vae.decode(z.to(vae_dtype)).sample)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        with attention_context(images.device, self.attention):
            latent = fp32(self.vae.encode(images.to(vae_dtype)).latent_dist.mean)
        return (latent - self.shift_factor) * self.scaling_factor


def encode_prompt(tokenizer, text_encoder, prompt: str, device: torch.device) -> torch.Tensor:
    """CLIP text-encoder hidden states (1, 77, D) for a prompt, padded to the model's max length."""
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = text_encoder(ids)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.detach()


class StableDiffusionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    required_modules: ClassVar[tuple[tuple[str, str], ...]] = DIFFUSERS_AND_TRANSFORMERS  # checked before anything loads
    id: PathOrName = Field(DEFAULT_SD_ID, description="hub id or local folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/")
    path: Optional[FilePath] = Field(None, description="local folder; overrides id and must exist")
    revision: Optional[str] = None
    variant: Optional[str] = Field(None, description="weight variant, e.g. 'fp16' (files *.fp16.safetensors)")
    local_files_only: bool = False
    prompt: Optional[str] = Field(None, description="content prompt c1; None: no prompt condition (unconditional)")
    negative_prompt: str = Field("", description="prompt of the 'unconditional' branch")
    guidance_scale: float = Field(7.5, ge=0.0, description="classifier-free guidance scale w")
    height: int = Field(512, ge=16, multiple_of=8)
    width: int = Field(512, ge=16, multiple_of=8)
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = Field(
        None, description="weight dtype of UNet, VAE and text encoder; default: the recipe's dtype")
    vae_dtype: Optional[Literal["float32", "float16", "bfloat16"]] = Field(
        None, description="VAE weight dtype if different (float32 avoids fp16 decoder overflow)")
    device: Optional[str] = None
    gradient_checkpointing: bool = Field(False, description="checkpoint UNet blocks and VAE decoder blocks")
    decode_size: Optional[int] = Field(
        None, ge=8, multiple_of=8,
        description="decode guidance passes at this side (e.g. 224): latent resized before the VAE decoder")
    attention: Literal["auto", "math", "default"] = "auto"
    clean_estimate: Literal["uncond", "cfg"] = Field(
        "uncond", description="what energies decode: the unconditional Tweedie estimate (default, one clean "
                              "estimate for all conditions) or the CFG one (FreeDoM's SD code; +1 UNet pass "
                              "per evaluation, energy gradients through both passes)")
    unet_checkpoint: Optional[FilePath] = Field(
        None, description="single-file UNet state dict in diffusers key names (.safetensors preferred)")

    @model_validator(mode="after")
    def _sizes(self):
        if self.decode_size is not None and self.decode_size > max(self.height, self.width):
            raise ValueError("decode_size larger than the image gains nothing")
        return self


def build_stable_diffusion(context: BuildContext, **options) -> StableDiffusionModel:
    """Stable Diffusion (v1.x layout) with the prompt as the first condition."""
    opts = StableDiffusionOptions(**options)
    require_modules("stable-diffusion", StableDiffusionOptions.required_modules)
    source = resolve_source(opts.id, opts.path, opts.revision, opts.local_files_only)  # fails before heavy imports
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = parse_dtype(opts.dtype, context.dtype)
    vae_dtype = parse_dtype(opts.vae_dtype, dtype)
    device = resolve_device(opts.device, context.device)
    extra = {"variant": opts.variant} if opts.variant else {}
    unet = load_pretrained(UNet2DConditionModel, source, "unet", torch_dtype=dtype, **extra)
    vae = load_pretrained(AutoencoderKL, source, "vae", torch_dtype=vae_dtype, **extra)
    if opts.unet_checkpoint:
        load_checkpoint_into(unet, opts.unet_checkpoint)
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_function)
        vae.enable_gradient_checkpointing(checkpoint_function)
    config = read_scheduler_config(source, ("scheduler",))
    if config is None:
        raise ConfigError(f"{source.name!r} has no scheduler/scheduler_config.json; the noise schedule is unknown")
    tokenizer = load_pretrained(CLIPTokenizer, source, "tokenizer")
    text_encoder = load_pretrained(CLIPTextModel, source, "text_encoder", dtype=dtype, **extra)
    text_encoder.to(device).eval()
    uncond = encode_prompt(tokenizer, text_encoder, opts.negative_prompt, device)
    cond = encode_prompt(tokenizer, text_encoder, opts.prompt, device) if opts.prompt is not None else None
    del text_encoder  # not needed while sampling: the embeddings are fixed
    model = StableDiffusionModel(unet, vae, cond, uncond, alphas_cumprod_from_config(config),
                                 opts.guidance_scale, opts.height, opts.width,
                                 config.get("prediction_type", "epsilon"), opts.decode_size, opts.attention,
                                 opts.prompt, opts.clean_estimate)
    return model.to(device)


def prompt_conditions(options: dict) -> int:
    """How many conditions the model adds before the recipe's, for checked options: the prompt."""
    return 1 if options.get("prompt") is not None else 0
