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

import copy
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
                                                  parse_dtype, read_scheduler_config, require_modules, require_tokenizer,
                                                  resolve_device, resolve_source)

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


def prompt_clone(model):
    """A shallow copy sharing the networks, with its own buffer table (the original keeps its prompt
    embeddings); only a model built with its text encoder(s) can take a new prompt."""
    if model.prompt_encoder is None:
        raise ConfigError("this model was built without its text encoder(s), so its prompt is fixed; build it "
                          "with keep_text_encoder=True to change the prompt between runs")
    clone = copy.copy(model)
    clone._buffers = dict(model._buffers)
    return clone


class StableDiffusionModel(DiffusionModel):
    """Latent eps(x_t, t) with the unconditional (negative-prompt) embedding; see the module doc."""

    # names of the text inputs per branch: buffers cond_<key> / uncond_<key> (a subclass adds "pooled")
    text_keys: ClassVar[tuple[str, ...]] = ("embedding",)

    def __init__(self, unet, vae, cond_embedding, uncond_embedding,
                 alphas_cumprod: torch.Tensor, guidance_scale: float = 7.5, height: int = 512, width: int = 512,
                 prediction_type: str = "epsilon", decode_size: Optional[int] = None, attention: str = "auto",
                 prompt: Optional[str] = None, clean_estimate: str = "uncond", prompt_encoder=None):
        """``cond_embedding`` / ``uncond_embedding``: the text encoder's hidden states, or a dict of
        the text inputs by ``text_keys``; ``prompt_encoder`` (a PromptEncoder) enables with_prompt."""
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if attention not in ATTENTION_POLICIES:
            raise ConfigError(f"attention {attention!r}; expected one of {ATTENTION_POLICIES}")
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))
        self._set_text("uncond", uncond_embedding)
        self._set_text("cond", cond_embedding)
        self.prompt_encoder = prompt_encoder
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

    def _set_text(self, branch: str, text) -> None:
        if text is None or torch.is_tensor(text):
            text = {"embedding": text}
        for key in self.text_keys:
            self.register_buffer(f"{branch}_{key}", text.get(key))

    # -- conditions --------------------------------------------------------------------------
    def model_conditions(self):
        if self.cond_embedding is None:
            return []
        return [PromptCondition("prompt", None, rule="cfg", scale=self.guidance_scale, model=self)]

    def with_prompt(self, prompt: Optional[str], negative_prompt: Optional[str] = None,
                    guidance_scale: Optional[float] = None) -> "StableDiffusionModel":
        """The same networks (shared, not copied) with new prompt embeddings, for scripts that change
        the prompt between runs; needs the text encoder(s) kept at build time."""
        device = self.uncond_embedding.device
        clone = prompt_clone(self)
        clone._set_text("uncond", self.prompt_encoder.unconditional(negative_prompt, device))
        clone._set_text("cond", self.prompt_encoder.encode(prompt, device) if prompt is not None else None)
        clone.prompt = prompt
        if guidance_scale is not None:
            clone.guidance_scale = float(guidance_scale)
        return clone

    def place_buffers(self, device: torch.device) -> "StableDiffusionModel":
        """Move this model's own tensors (schedule, embeddings) only, leaving the networks where their
        owner (or an offloading hook) put them."""
        for name, value in self._buffers.items():
            if value is not None:
                self._buffers[name] = value.to(device)
        return self

    # -- network -----------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _unet_inputs(self, branch: str, batch: int) -> dict:
        """The UNet's keyword inputs of branch "cond" or "uncond" for a batch."""
        embedding = getattr(self, f"{branch}_embedding")
        return {"encoder_hidden_states": embedding.to(self.weight_dtype).expand(batch, -1, -1)}

    def _unet(self, x: torch.Tensor, t: int, branch: str) -> torch.Tensor:
        b = x.shape[0]
        timestep = torch.full((b,), int(t), device=x.device, dtype=torch.long)
        with attention_context(x.device, self.attention):
            out = fp32(self.unet(x.to(self.weight_dtype), timestep, **self._unet_inputs(branch, b)).sample)
        return out

    def _to_eps(self, out, x, t):
        return output_to_eps(out, fp32(x), float(self.alphas_cumprod[t]), self.prediction_type)

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The unconditional (negative-prompt) prediction; the prompt enters as a condition."""
        return self._to_eps(self._unet(x_t, t, "uncond"), x_t, t)

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
        return self._to_eps(self._unet(x_t, t, "cond"), x_t, t)

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
    return PromptEncoder([tokenizer], [text_encoder]).encode(prompt, device)["embedding"]


class PromptEncoder:
    """Tokenizer(s) + CLIP text encoder(s): a prompt -> the UNet's text inputs, as the diffusers
    pipelines compute them.  One encoder (SD 1.x/2.x): its last hidden states.  Several (SDXL,
    ``penultimate``): each one's penultimate hidden states concatenated along features, and
    "pooled" = the projected pooled output of the encoder that has one (text_embeds)."""

    def __init__(self, tokenizers: list, text_encoders: list, penultimate: bool = False,
                 zeros_for_empty: bool = False):
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.penultimate, self.zeros_for_empty = penultimate, zeros_for_empty

    def encode(self, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():  # offloading hooks move the encoder and the ids to its execution device
                out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=self.penultimate)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2] if self.penultimate else out[0])
        text = {"embedding": torch.cat(hidden, dim=-1).detach().to(device)}
        if pooled is not None:
            text["pooled"] = pooled.detach().to(device)
        return text

    def unconditional(self, negative_prompt: Optional[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The negative prompt's inputs; no negative prompt and ``zeros_for_empty`` (SDXL's
        force_zeros_for_empty_prompt): zeros, as the diffusers pipeline does."""
        if negative_prompt is None and self.zeros_for_empty:
            return {k: torch.zeros_like(v) for k, v in self.encode("", device).items()}
        return self.encode(negative_prompt or "", device)


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
    keep_text_encoder: bool = Field(
        False, description="keep the text encoder(s) after encoding the prompt, so a script can change the "
                           "prompt between runs (ZMagicPipeline sets it); costs their memory")
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


# options that say where the weights come from and in which dtype: meaningless for loaded components
LOADING_OPTIONS = ("id", "path", "revision", "variant", "local_files_only", "dtype", "vae_dtype", "device",
                   "unet_checkpoint")


# the transformers class of each text component of the diffusers SD / SDXL layouts
TEXT_CLASSES = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "text_encoder": "CLIPTextModel",
                "text_encoder_2": "CLIPTextModelWithProjection"}


def load_latent_parts(kind: str, opts, context: BuildContext, text_parts: tuple[str, ...],
                      vae_source=None) -> tuple[dict, torch.device]:
    """(components by diffusers name + "scheduler_config", device) of a latent text-to-image model
    from a hub id or folder: unet, vae (from ``vae_source`` when given), ``text_parts``
    (tokenizer*/text_encoder* subfolders, classes as in TEXT_CLASSES), the noise schedule."""
    require_modules(kind, type(opts).required_modules)
    source = resolve_source(opts.id, opts.path, opts.revision, opts.local_files_only)  # fails before heavy imports
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = parse_dtype(opts.dtype, context.dtype)
    extra = {"variant": opts.variant} if opts.variant else {}
    parts: dict[str, Any] = {"unet": load_pretrained(UNet2DConditionModel, source, "unet", torch_dtype=dtype, **extra)}
    vae_dtype = parse_dtype(opts.vae_dtype, dtype)
    if vae_source is None:
        parts["vae"] = load_pretrained(AutoencoderKL, source, "vae", torch_dtype=vae_dtype, **extra)
    else:  # a separate VAE folder or repo (e.g. an fp16-fixed VAE): root layout, or vae/ inside
        sub = "vae" if vae_source.has_file("vae/config.json") else None
        parts["vae"] = load_pretrained(AutoencoderKL, vae_source, sub, torch_dtype=vae_dtype)
    if opts.unet_checkpoint:
        load_checkpoint_into(parts["unet"], opts.unet_checkpoint)
    check_latent_unet(kind, parts["unet"].config, parts["vae"].config, source.where())
    parts["scheduler_config"] = read_scheduler_config(source, ("scheduler",))
    if parts["scheduler_config"] is None:
        raise ConfigError(f"{source.name!r} has no scheduler/scheduler_config.json; the noise schedule is unknown")
    for name in text_parts:
        if name.startswith("tokenizer"):
            require_tokenizer(source, name)
        kwargs = {} if name.startswith("tokenizer") else {"dtype": dtype, **extra}
        parts[name] = load_pretrained(getattr(transformers, TEXT_CLASSES[name]), source, name, **kwargs)
    return parts, resolve_device(opts.device, context.device)


def check_latent_unet(kind: str, unet, vae, where: str) -> None:
    """The UNet of a text-to-image model of ``kind``, checked before any step runs: the family (an SDXL UNet
    wants its extra embeddings), and a latent of the VAE's channels (an inpainting UNet takes 9)."""
    sdxl = unet.get("addition_embed_type") == "text_time"
    if sdxl != (kind == "stable-diffusion-xl"):
        family = "an SDXL" if sdxl else "a Stable Diffusion 1.x/2.x"
        right = "stable-diffusion-xl" if sdxl else "stable-diffusion"
        raise ConfigError(f"model: {where} holds {family} UNet; use model kind {right!r}")
    if unet.get("in_channels") != vae.get("latent_channels"):
        raise ConfigError(f"model: the UNet in {where} takes {unet.get('in_channels')} channels and the VAE's latents "
                          f"have {vae.get('latent_channels')} (an inpainting or other variant UNet); a text-to-image "
                          "UNet is needed")


def assemble_latent_model(model_cls, parts: dict, encoder: PromptEncoder, opts, device: torch.device,
                          move_modules: bool = True, **extra):
    """A latent text-to-image model of class ``model_cls`` from its components and checked options;
    the prompt and negative prompt are encoded once (``move_modules`` False: the networks stay where
    their owner put them, e.g. under offloading hooks, and only the model's own tensors move)."""
    unet, vae = parts["unet"], parts["vae"]
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_function)
        vae.enable_gradient_checkpointing(checkpoint_function)
    if move_modules:
        for text_encoder in encoder.text_encoders:
            text_encoder.to(device).eval()
    uncond = encoder.unconditional(opts.negative_prompt, device)
    cond = encoder.encode(opts.prompt, device) if opts.prompt is not None else None
    config = parts["scheduler_config"]
    model = model_cls(unet, vae, cond, uncond, alphas_cumprod_from_config(config), opts.guidance_scale,
                      opts.height, opts.width, config.get("prediction_type", "epsilon"), opts.decode_size,
                      opts.attention, opts.prompt, opts.clean_estimate,
                      prompt_encoder=encoder if opts.keep_text_encoder else None, **extra)
    # without keep_text_encoder nothing refers to the text encoder(s) after this: their memory is freed
    return model.to(device) if move_modules else model.place_buffers(device)


def build_stable_diffusion(context: BuildContext, **options) -> StableDiffusionModel:
    """Stable Diffusion (v1.x layout) with the prompt as the first condition."""
    opts = StableDiffusionOptions(**options)
    parts, device = load_latent_parts("stable-diffusion", opts, context, ("tokenizer", "text_encoder"))
    return stable_diffusion_from_components(parts, opts, device)


def stable_diffusion_from_components(parts: dict, opts: StableDiffusionOptions, device: torch.device,
                                     move_modules: bool = True) -> StableDiffusionModel:
    """The ``stable-diffusion`` model from loaded components (unet, vae, tokenizer, text_encoder and
    the scheduler's config as "scheduler_config")."""
    encoder = PromptEncoder([parts["tokenizer"]], [parts["text_encoder"]])
    return assemble_latent_model(StableDiffusionModel, parts, encoder, opts, device, move_modules)


def prompt_conditions(options: dict) -> int:
    """How many conditions the model adds before the recipe's, for checked options: the prompt."""
    return 1 if options.get("prompt") is not None else 0
