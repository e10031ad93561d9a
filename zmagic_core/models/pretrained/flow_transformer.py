"""Model kind ``flow-transformer``: diffusers' flow-matching transformers, SD3 / SD3.5 and FLUX.

A :class:`~zmagic_core.method.flow.FlowModel`: the transformer predicts the velocity v = eps - x0 on
the straight path x_s = (1 - s) x0 + s eps, and the sampler sees the VP point x_t = k(s) x_s
(docs/method.md, "Flow matching"), so every solver, combiner and energy runs unchanged.

* ``sd3`` (StableDiffusion3Pipeline: SD3Transformer2DModel, CLIP-L + CLIP-G + optional T5):
  classifier-free guidance as in stable_diffusion.py.  The base score is the negative prompt's
  ("" by default) and the prompt is condition c1 with g = w (s_cond - s_uncond); under ``sum`` the
  step is exactly the pipeline's CFG step (CFG on velocities equals CFG on eps: eps = x_s + (1 - s) v).
* ``flux`` (FluxPipeline: FluxTransformer2DModel, CLIP-L pooled + T5, packed 2x2 latents):
  FLUX-dev is guidance-distilled: one conditional pass, the guidance value enters the transformer's
  guidance embedding, there is no unconditional pass.  The base score is then the prompt's
  (guided) prediction itself and the prompt stays condition c1 with g = 0: under ``sum`` the step is
  FluxPipeline's; under ``dependent`` x_hat = Phi_t(x_t, s) is the point the FLUX step reaches, where
  the second energy is evaluated (as x_hat is the CFG step's point on SD3); ``cagrad``'s pair
  (c2, c1) is g2 itself.  With ``true_cfg_scale`` > 1 FLUX runs as SD3 does (FluxPipeline's true
  CFG): the negative prompt's prediction is the base and the prompt adds w (s_cond - s_uncond).
* x_t is the VP-rescaled latent (C, H/8, W/8), unpacked for FLUX as well (the transformer packs
  and unpacks around its call; packing is a permutation); energies see decode(x0):
  VAE(latents / scaling_factor + shift_factor), in [-1, 1].
* The noise schedule: the scheduler config's ``shift``, or with ``use_dynamic_shifting`` the shift
  mu from the image's token count as the pipelines compute it (FLUX-dev: mu(1024 px) = 1.15).
  The sampler visits the strided grid s = shift((t + 1) / T); diffusers' default grid differs
  (linspace), the steps are the same Euler steps at the levels each visits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator

from zmagic_core.contracts.components import BuildContext, Prediction
from zmagic_core.contracts.errors import ConfigError, WeightsNotFoundError
from zmagic_core.contracts.options import FilePath, PathOrName
from zmagic_core.method.flow import (FlowModel, eps_from_velocity, flow_alphas_cumprod, vp_scale,
                                     x0_from_velocity)
from zmagic_core.method.guidance import Condition
from zmagic_core.models.pretrained.attention import ATTENTION_POLICIES, attention_context, checkpoint_function
from zmagic_core.files.weights import hub_offline
from zmagic_core.models.pretrained.loading import (fp32, load_checkpoint_into, load_pretrained, parse_dtype,
                                                  require_modules, require_tokenizer, resolve_device, resolve_source)
from zmagic_core.models.pretrained.stable_diffusion import (PromptCondition, StableDiffusionModel,
                                                           StableDiffusionOptions, prompt_clone)

DEFAULT_IDS = {"sd3": "stabilityai/stable-diffusion-3.5-medium", "flux": "black-forest-labs/FLUX.1-dev"}
FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
            "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# the pipelines' own defaults: guidance, T5 tokens, max_shift of calculate_shift
FAMILY_DEFAULTS = {"sd3": {"guidance_scale": 7.0, "max_sequence_length": 256, "max_shift": 1.16},
                   "flux": {"guidance_scale": 3.5, "max_sequence_length": 512, "max_shift": 1.15}}
# scheduler settings whose sigmas depend on the step count or are not a shifted (t + 1) / T grid
UNSUPPORTED_SCHEDULER = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                         "invert_sigmas")


@dataclass
class DistilledPromptCondition(Condition):
    """The prompt of a guidance-distilled model (FLUX-dev) as c1: it is already inside the base
    score (the conditional prediction), so g = 0.  Kept as a condition so that ``dependent`` and
    ``cagrad`` see the prompt's step as the first move; its "energy" is 0."""

    def guidance(self, ev, create_graph):
        zero = ev.x * 0.0  # a graph to x (zero derivative) so a double backward through g_1 still runs
        return torch.zeros(ev.x.shape[0], device=ev.x.device), zero

    def energy_only(self, ev):
        return torch.zeros(ev.x.shape[0], device=ev.x.device)


class TextEncoder:
    """A prompt -> the transformer's text inputs, by the diffusers pipeline's own ``encode_prompt``
    (CLIP-L/G penultimate states, T5 padded to ``max_sequence_length``, pooled CLIP outputs)."""

    def __init__(self, pipeline, family: str, max_sequence_length: int):
        self.pipeline, self.family, self.max_sequence_length = pipeline, family, max_sequence_length

    def encode(self, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            if self.family == "sd3":
                hidden, _, pooled, _ = self.pipeline.encode_prompt(
                    prompt, None, None, device=device, do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length)
            else:
                hidden, pooled, _ = self.pipeline.encode_prompt(
                    prompt, None, device=device, max_sequence_length=self.max_sequence_length)
        return {"hidden": hidden.detach().to(device), "pooled": pooled.detach().to(device)}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing: (B, C, H, W) -> (B, H/2 * W/2, 4C)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of side (height, width)."""
    b, _, c4 = x.shape
    x = x.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """FLUX's positions of the packed tokens: (H/2 * W/2, 3) rows (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


class FlowTransformerModel(FlowModel):
    """Velocity of an SD3 / FLUX transformer as a VP epsilon model; see the module docstring.

    Text inputs are buffers ``<branch>_hidden`` / ``<branch>_pooled`` for branches "uncond" (the
    negative prompt) and "cond" (the prompt); the base velocity uses ``base_branch``."""

    # the VAE side is Stable Diffusion's (same attributes: vae, scaling_factor, shift_factor,
    # vae_factor, decode_size, attention), and so is moving only the model's own tensors
    decode = StableDiffusionModel.decode
    encode = StableDiffusionModel.encode
    place_buffers = StableDiffusionModel.place_buffers

    def __init__(self, transformer, vae, family: str, alphas_cumprod: torch.Tensor,
                 cond: Optional[dict], uncond: Optional[dict], cfg: bool, guidance_scale: float,
                 embedded_guidance: Optional[float], height: int, width: int,
                 decode_size: Optional[int] = None, attention: str = "auto", prompt: Optional[str] = None,
                 clean_estimate: str = "uncond", prompt_encoder: Optional[TextEncoder] = None):
        super().__init__()
        if attention not in ATTENTION_POLICIES:
            raise ConfigError(f"attention {attention!r}; expected one of {ATTENTION_POLICIES}")
        if clean_estimate not in ("uncond", "cfg"):
            raise ConfigError(f"clean_estimate {clean_estimate!r}; expected 'uncond' or 'cfg'")
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.family, self.cfg, self.attention, self.clean_estimate = family, cfg, attention, clean_estimate
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))
        self._set_text("uncond", uncond)
        self._set_text("cond", cond)
        self.prompt, self.prompt_encoder = prompt, prompt_encoder
        self.guidance_scale = float(guidance_scale)  # the CFG weight w (PromptCondition reads it)
        self.embedded_guidance = embedded_guidance  # FLUX-dev's guidance-embedding value
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.decode_size = decode_size
        self.num_train = int(alphas_cumprod.shape[0])
        h, w = height // self.vae_factor, width // self.vae_factor
        self.sample_shape = (int(vae.config.latent_channels), h, w)
        if family == "flux":
            self.register_buffer("img_ids", latent_image_ids(h, w, torch.device("cpu")))

    def _set_text(self, branch: str, text: Optional[dict]) -> None:
        for key in ("hidden", "pooled"):
            self.register_buffer(f"{branch}_{key}", None if text is None else text[key])

    @property
    def base_branch(self) -> str:
        """The distilled model without CFG steps with the prompt itself; otherwise the negative prompt."""
        return "cond" if (self.cond_hidden is not None and not self.cfg) else "uncond"

    # -- conditions --------------------------------------------------------------------------
    def model_conditions(self):
        if self.cond_hidden is None:
            return []
        if self.cfg:
            return [PromptCondition("prompt", None, rule="cfg", scale=self.guidance_scale, model=self)]
        return [DistilledPromptCondition("prompt", None, rule="distilled", scale=self.embedded_guidance or 0.0)]

    def with_prompt(self, prompt: Optional[str], negative_prompt: Optional[str] = None,
                    guidance_scale: Optional[float] = None) -> "FlowTransformerModel":
        """The same networks (shared) with new prompt embeddings; needs ``keep_text_encoder``.
        ``guidance_scale`` means what the option does: SD3's CFG w, FLUX's embedded guidance."""
        device = self.alphas_cumprod.device
        clone = prompt_clone(self)
        needs_uncond = self.cfg or prompt is None
        clone._set_text("uncond", self.prompt_encoder.encode(negative_prompt or "", device) if needs_uncond else None)
        clone._set_text("cond", self.prompt_encoder.encode(prompt, device) if prompt is not None else None)
        clone.prompt = prompt
        if guidance_scale is not None:
            if self.family == "flux":
                clone.embedded_guidance = float(guidance_scale)
            else:
                clone.guidance_scale = float(guidance_scale)
        return clone

    # -- network -----------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def branch_velocity(self, x_flow: torch.Tensor, sigma: float, branch: str) -> torch.Tensor:
        """The transformer's velocity (float32, shaped like x_flow) with one branch's text."""
        b, dtype = x_flow.shape[0], self.weight_dtype
        hidden = getattr(self, f"{branch}_hidden").to(dtype).expand(b, -1, -1)
        pooled = getattr(self, f"{branch}_pooled").to(dtype).expand(b, -1)
        # the pipelines' timestep: SD3 takes s * T, FLUX (s * T) / 1000 (its embedding multiplies by 1000)
        t_value = sigma * self.num_train / (1000.0 if self.family == "flux" else 1.0)
        timestep = torch.full((b,), t_value, device=x_flow.device, dtype=torch.float32)
        with attention_context(x_flow.device, self.attention):
            if self.family == "sd3":
                out = self.transformer(hidden_states=x_flow.to(dtype), timestep=timestep, encoder_hidden_states=hidden,
                                       pooled_projections=pooled, return_dict=False)[0]
                return fp32(out)
            guidance = None
            if self.embedded_guidance is not None:
                guidance = torch.full((b,), self.embedded_guidance, device=x_flow.device, dtype=torch.float32)
            txt_ids = torch.zeros(hidden.shape[1], 3, device=x_flow.device)  # FluxPipeline's text positions
            out = self.transformer(hidden_states=pack_latents(x_flow.to(dtype)), timestep=timestep, guidance=guidance,
                                   pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=txt_ids,
                                   img_ids=self.img_ids, return_dict=False)[0]
            return fp32(unpack_latents(out, *x_flow.shape[-2:]))

    def velocity(self, x_flow: torch.Tensor, t: int, sigma: float) -> torch.Tensor:
        """The base velocity: the negative prompt's, or (distilled, no CFG) the prompt's."""
        return self.branch_velocity(x_flow, sigma, self.base_branch)

    def eps_cond(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The prompt's prediction as a VP eps at (x_t, t) (PromptCondition's conditional pass)."""
        sigma = self.sigma(t)
        x_flow = fp32(x_t) / vp_scale(sigma)
        return eps_from_velocity(self.branch_velocity(x_flow, sigma, "cond"), x_flow, sigma)

    def predict(self, x_t: torch.Tensor, t: int) -> Prediction:
        """The base eps and clean estimate; with ``clean_estimate="cfg"`` (CFG, a prompt, grad mode)
        x0 is the CFG estimate x0_u - s w (v_c - v_u) and the prompt's eps goes to ``extras``."""
        sigma = self.sigma(t)
        x_flow = fp32(x_t) / vp_scale(sigma)
        v = self.velocity(x_flow, t, sigma)
        eps, x0 = eps_from_velocity(v, x_flow, sigma), x0_from_velocity(v, x_flow, sigma)
        if self.clean_estimate == "cfg" and self.cfg and self.cond_hidden is not None and torch.is_grad_enabled():
            v_c = self.branch_velocity(x_flow, sigma, "cond")
            x0 = x0 - sigma * self.guidance_scale * (v_c - v)
            return Prediction(eps, x0, {"eps_cond": eps_from_velocity(v_c, x_flow, sigma)})
        return Prediction(eps, x0)


FLOW_LOADING_OPTIONS = ("family", "t5", "transformer_checkpoint")  # beside stable_diffusion.LOADING_OPTIONS


class FlowTransformerOptions(StableDiffusionOptions):
    id: Optional[PathOrName] = Field(
        None, description="hub id or local folder (StableDiffusion3Pipeline or FluxPipeline layout); default "
                          f"{DEFAULT_IDS['sd3']}, or {DEFAULT_IDS['flux']} with family: flux")
    family: Optional[Literal["sd3", "flux"]] = Field(
        None, description="model family; default: from model_index.json's _class_name or the transformer config")
    guidance_scale: Optional[float] = Field(
        None, ge=0.0, description="sd3: classifier-free guidance scale w (default 7.0); flux: the distilled "
                                  "guidance fed to the guidance embedding (default 3.5)")
    true_cfg_scale: float = Field(
        1.0, ge=0.0, description="flux: above 1, classifier-free guidance on top with negative_prompt as the "
                                 "unconditional branch (FluxPipeline's true_cfg_scale; two passes per step)")
    height: int = Field(1024, ge=16, multiple_of=16)
    width: int = Field(1024, ge=16, multiple_of=16)
    max_sequence_length: Optional[int] = Field(
        None, ge=1, le=512, description="T5 tokens of the prompt (default: sd3 256, flux 512)")
    t5: bool = Field(True, description="sd3: false loads no T5 encoder (zeros in its place, as diffusers allows)")
    shift: Optional[float] = Field(None, gt=0, description="static shift of the noise levels; default: the "
                                                           "scheduler config's")
    mu: Optional[float] = Field(None, description="dynamic shift mu; default (use_dynamic_shifting): from the image "
                                                  "size as the pipeline computes it")
    transformer_checkpoint: Optional[FilePath] = Field(
        None, description="single-file transformer state dict in diffusers key names (.safetensors preferred)")
    unet_checkpoint: None = Field(None, description="not used by this kind (see transformer_checkpoint)")

    @model_validator(mode="after")
    def _shift_or_mu(self):
        if self.shift is not None and self.mu is not None:
            raise ValueError("give shift (static) or mu (dynamic shifting), not both")
        return self


def calculate_shift(image_seq_len: int, config: dict, family: str) -> float:
    """The pipelines' dynamic shift mu: linear in the token count between base and max."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", FAMILY_DEFAULTS[family]["max_shift"])
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


def flow_schedule(config: dict, family: str, image_seq_len: int, shift: Optional[float] = None,
                  mu: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """(abar per training timestep, the shift used) from a FlowMatchEulerDiscreteScheduler config."""
    bad = [k for k in UNSUPPORTED_SCHEDULER if config.get(k)]
    if config.get("time_shift_type", "exponential") != "exponential":
        bad.append(f"time_shift_type={config['time_shift_type']}")
    if bad:
        raise ConfigError(f"scheduler config sets {', '.join(bad)}: not supported by flow-transformer (its noise "
                          f"levels are the shifted (t + 1) / T grid); remove them or pass a plain scheduler config")
    steps = int(config.get("num_train_timesteps", 1000))
    if shift is None and (mu is not None or config.get("use_dynamic_shifting")):
        mu = calculate_shift(image_seq_len, config, family) if mu is None else mu
        return flow_alphas_cumprod(steps, mu=mu), {"mu": mu}
    shift = float(config.get("shift", 1.0)) if shift is None else shift
    return flow_alphas_cumprod(steps, shift=shift), {"shift": shift}


def family_of(parts: dict, given: Optional[str] = None) -> str:
    if given is not None:
        return given
    family = FAMILIES.get(type(parts.get("transformer")).__name__)
    if family is None:
        raise ConfigError(f"not an SD3 or FLUX transformer: {type(parts.get('transformer')).__name__}; "
                          f"expected one of SD3Transformer2DModel, FluxTransformer2DModel")
    return family


def flow_transformer_from_components(parts: dict, opts: FlowTransformerOptions, device: torch.device,
                                     move_modules: bool = True) -> FlowTransformerModel:
    """The ``flow-transformer`` model from loaded components (the diffusers pipeline's components by
    name, and the scheduler's config as "scheduler_config"); ``move_modules`` False leaves the
    networks where their owner (or an offloading hook) put them."""
    import diffusers

    family = family_of(parts, opts.family)
    defaults = FAMILY_DEFAULTS[family]
    transformer, vae = parts["transformer"], parts["vae"]
    if family == "flux" and parts.get("text_encoder_2") is None:
        raise ConfigError("flux needs its T5 encoder (text_encoder_2); t5: false applies to sd3 only")
    if opts.gradient_checkpointing:
        transformer.enable_gradient_checkpointing(checkpoint_function)
        vae.enable_gradient_checkpointing(checkpoint_function)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    patch = 2 if family == "flux" else int(transformer.config.patch_size)
    if opts.height % (factor * patch) or opts.width % (factor * patch):
        raise ConfigError(f"height and width must be multiples of {factor * patch} for this model "
                          f"(VAE factor {factor} x patch {patch}); got {opts.height} x {opts.width}")
    seq_len = (opts.height // factor // patch) * (opts.width // factor // patch)
    alphas_cumprod, _ = flow_schedule(parts["scheduler_config"], family, seq_len, opts.shift, opts.mu)
    # the pipeline object is only the text side's encode_prompt; it shares the modules (no copies)
    pipeline_cls = getattr(diffusers, PIPELINES[family])
    names = set(pipeline_cls._get_signature_keys(pipeline_cls)[0])
    scheduler = parts.get("scheduler") or diffusers.FlowMatchEulerDiscreteScheduler.from_config(parts["scheduler_config"])
    pipeline = pipeline_cls(**{**{k: parts.get(k) for k in names}, "scheduler": scheduler})
    encoder = TextEncoder(pipeline, family, opts.max_sequence_length or defaults["max_sequence_length"])
    if move_modules:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if parts.get(name) is not None:
                parts[name].to(device).eval()
    cfg = family == "sd3" or opts.true_cfg_scale > 1.0
    guidance = defaults["guidance_scale"] if opts.guidance_scale is None else opts.guidance_scale
    cond = encoder.encode(opts.prompt, device) if opts.prompt is not None else None
    uncond = encoder.encode(opts.negative_prompt, device) if (cfg or cond is None) else None
    embedded = guidance if family == "flux" and transformer.config.guidance_embeds else None
    model = FlowTransformerModel(transformer, vae, family, alphas_cumprod, cond, uncond, cfg,
                                 guidance if family == "sd3" else opts.true_cfg_scale, embedded,
                                 opts.height, opts.width, opts.decode_size, opts.attention, opts.prompt,
                                 opts.clean_estimate, encoder if opts.keep_text_encoder else None)
    # without keep_text_encoder nothing refers to the text encoders after this: their memory is freed
    return model.to(device) if move_modules else model.place_buffers(device)


def read_json(source, relative: str) -> Optional[dict]:
    """A JSON file of a pipeline folder or repository (None: it has none, or it is not reachable; the
    pipeline load then reports why)."""
    if source.local:
        path = Path(source.root) / relative
        if not path.is_file():
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source.root, relative, revision=source.revision,
                                        local_files_only=source.local_files_only or hub_offline()))
        except Exception:  # the hub client raises many types
            return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsNotFoundError(f"{relative} of {source.name!r} is not valid JSON ({exc})") from None


def named_classes(source, index: Optional[dict]) -> list[Optional[str]]:
    """The class names model_index.json and transformer/config.json give (None where absent)."""
    return [(index or {}).get("_class_name"), (read_json(source, "transformer/config.json") or {}).get("_class_name")]


def detect_family(source, index: Optional[dict]) -> str:
    """sd3 or flux from model_index.json's _class_name, else from the transformer config's."""
    names = named_classes(source, index)
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    raise ConfigError(f"{source.name!r} is not an SD3 or FLUX pipeline (model_index.json and transformer/config.json "
                      f"name {names[0] or 'nothing'} and {names[1] or 'nothing'}); give family: sd3 or family: flux "
                      f"if it is one")


def build_flow_transformer(context: BuildContext, **options) -> FlowTransformerModel:
    """SD3 / SD3.5 or FLUX from a hub id or folder, with the prompt as the first condition."""
    opts = FlowTransformerOptions(**options)
    require_modules("flow-transformer", type(opts).required_modules)
    model_id = opts.id or DEFAULT_IDS[opts.family or "sd3"]
    source = resolve_source(model_id, opts.path, opts.revision, opts.local_files_only)  # fails before heavy imports
    import diffusers

    index = read_json(source, "model_index.json")
    family = opts.family or detect_family(source, index)
    for where, name in zip(("model_index.json", "transformer/config.json"), named_classes(source, index)):
        named = FAMILIES.get(name)
        if named is not None and named != family:  # diffusers would fail deep in loading the other family's parts
            raise ConfigError(f"model.options.family: {family}, but {source.name!r} is a {named} pipeline (its "
                              f"{where} names {name}); give family: {named} or leave it out")
    if family == "flux" and not opts.t5:  # FLUX's prompt goes through T5 only: without it there is none
        raise ConfigError("model.options.t5: false is for sd3 only; FLUX encodes the prompt with its T5")
    dtype = parse_dtype(opts.dtype, context.dtype)
    extra: dict[str, Any] = {"variant": opts.variant} if opts.variant else {}
    # no IP-adapter image encoder; sd3 without T5 when asked or when the folder has none
    skip = ["image_encoder", "feature_extractor"]
    if family == "sd3" and (not opts.t5 or not (index or {}).get("text_encoder_3", [None])[0]):
        skip += ["text_encoder_3", "tokenizer_3"]
    for name, entry in (index or {}).items():  # every tokenizer the pipeline will load must be there
        if name.startswith("tokenizer") and name not in skip and isinstance(entry, list) and entry[0]:
            require_tokenizer(source, name)
    pipeline = load_pretrained(getattr(diffusers, PIPELINES[family]), source, what=PIPELINES[family],
                               torch_dtype=dtype, **{k: None for k in skip}, **extra)
    parts = dict(pipeline.components)
    parts["scheduler_config"] = dict(pipeline.scheduler.config)
    if parse_dtype(opts.vae_dtype, dtype) != dtype:
        parts["vae"].to(parse_dtype(opts.vae_dtype, dtype))
    if opts.transformer_checkpoint:
        load_checkpoint_into(parts["transformer"], opts.transformer_checkpoint)
    del pipeline
    return flow_transformer_from_components(parts, opts.model_copy(update={"family": family}),
                                            resolve_device(opts.device, context.device))
