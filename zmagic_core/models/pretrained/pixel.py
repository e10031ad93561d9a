"""Model kind ``diffusers-pixel``: any diffusers ``UNet2DModel`` (pixel space) with its noise schedule.

Default: ``google/ddpm-ema-celebahq-256``, the public diffusers port of the CelebA-HQ 256 DDPM
the paper's face experiments use (1000 steps, linear betas 1e-4 .. 0.02, epsilon prediction).
Accepted layouts: a pipeline folder or repo (``unet/`` + ``scheduler/`` subfolders, as
``save_pretrained`` of a DDPMPipeline writes), a flat one (``config.json`` +
``scheduler_config.json`` at the root), or a bare UNet folder with the schedule given as options.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from zmagic_core.contracts.components import BuildContext, DiffusionModel
from zmagic_core.contracts.errors import ConfigError
from zmagic_core.contracts.options import FilePath, PathOrName
from zmagic_core.models.pretrained.attention import ATTENTION_POLICIES, attention_context, checkpoint_function
from zmagic_core.method.predictions import PREDICTION_TYPES, alphas_cumprod_from_config, output_to_eps
from zmagic_core.models.pretrained.loading import (DIFFUSERS_MODULES, fp32, load_pretrained, load_checkpoint_into, parse_dtype,
                                                  read_scheduler_config, require_modules, resolve_device, resolve_source)

DEFAULT_PIXEL_ID = "google/ddpm-ema-celebahq-256"


class DiffusersPixelModel(DiffusionModel):
    """eps(x_t, t) of a diffusers UNet2DModel; every prediction type converted to epsilon.

    The UNet runs in its weight dtype (float32, float16 or bfloat16); inputs are cast to it and
    outputs back to float32, so the guidance maths stays in float32.
    """

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 sample_size: Optional[int] = None, attention: str = "auto"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if attention not in ATTENTION_POLICIES:
            raise ConfigError(f"attention {attention!r}; expected one of {ATTENTION_POLICIES}")
        self.unet = unet.eval().requires_grad_(False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))
        self.prediction_type, self.attention = prediction_type, attention
        size = sample_size or unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (int(unet.config.in_channels), int(h), int(w))

    @property
    def weight_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def network(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The raw network output (float32), learned-variance channels dropped."""
        timestep = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        with attention_context(x_t.device, self.attention):
            out = fp32(self.unet(x_t.to(self.weight_dtype), timestep).sample)
        channels = x_t.shape[1]
        if out.shape[1] == 2 * channels:  # learned variance (e.g. variance_type learned_range)
            out = out[:, :channels]
        return out

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        out = self.network(x_t, t)
        return output_to_eps(out, fp32(x_t), float(self.alphas_cumprod[t]), self.prediction_type)


class DiffusersPixelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    required_modules: ClassVar[tuple[tuple[str, str], ...]] = DIFFUSERS_MODULES  # checked before anything loads
    id: PathOrName = Field(DEFAULT_PIXEL_ID, description="hub id or local folder (pipeline, flat or bare UNet layout)")
    path: Optional[FilePath] = Field(None, description="local folder; overrides id and must exist")
    subfolder: Optional[str] = Field(None, description="UNet subfolder; default: 'unet' if present, else the root")
    scheduler_subfolder: Optional[str] = Field(
        None, description="scheduler subfolder; default: 'scheduler' if present, else the root")
    revision: Optional[str] = None
    local_files_only: bool = Field(False, description="never contact the hub")
    checkpoint: Optional[FilePath] = Field(
        None, description="single-file UNet state dict (.safetensors; .ckpt/.bin/.pt via torch.load(weights_only=True)) "
                          "loaded over the weights, diffusers key names")
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = Field(
        None, description="weight dtype; default: the recipe's dtype. Guidance maths stays float32")
    device: Optional[str] = Field(None, description="default: the recipe's device")
    gradient_checkpointing: bool = Field(False, description="recompute UNet blocks in backward (less memory, ~1.3-2x time)")
    attention: Literal["auto", "math", "default"] = Field(
        "auto", description="MATH attention kernel when a double backward may follow (auto), always, or never")
    sample_size: Optional[int] = Field(None, ge=8, description="image side; default: the UNet config's sample_size")
    # schedule, used when no scheduler config is found (bare UNet folder) or to override it
    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample"]] = None
    beta_schedule: Optional[Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]] = None
    beta_start: Optional[float] = Field(None, gt=0)
    beta_end: Optional[float] = Field(None, gt=0)
    num_train_timesteps: Optional[int] = Field(None, ge=2)


def _pick_subfolder(source, explicit: Optional[str], candidate: str, filename: str) -> Optional[str]:
    if explicit is not None:
        return explicit or None
    return candidate if source.has_file(f"{candidate}/{filename}") else None


def check_pixel_unet(config, sample_size: Optional[int], where: str) -> None:
    """What a UNet2DModel must be for unconditional sampling here, checked before any step runs."""
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise ConfigError(f"model: the UNet2DModel in {where} is class-conditional (it needs class labels); "
                          "diffusers-pixel samples unconditional models")
    side = sample_size or config.get("sample_size")
    side = side if isinstance(side, int) else max(side or (0,))
    factor = 2 ** (len(config.get("down_block_types") or ()) - 1)
    if side and factor > 1 and side % factor:  # the skip connections' sizes would not match
        raise ConfigError(f"model.options.sample_size: {side} is not a multiple of {factor}, the UNet's "
                          f"downsampling ({len(config['down_block_types'])} blocks)")


def build_diffusers_pixel(context: BuildContext, **options) -> DiffusersPixelModel:
    """A diffusers UNet2DModel (pixel space) from a hub id or folder, as an eps-prediction model."""
    opts = DiffusersPixelOptions(**options)
    require_modules("diffusers-pixel", DiffusersPixelOptions.required_modules)
    source = resolve_source(opts.id, opts.path, opts.revision, opts.local_files_only)  # fails before heavy imports
    from diffusers import UNet2DModel

    unet_sub = _pick_subfolder(source, opts.subfolder, "unet", "config.json")
    dtype = parse_dtype(opts.dtype, context.dtype)
    unet = load_pretrained(UNet2DModel, source, unet_sub, what="UNet2DModel", torch_dtype=dtype)
    check_pixel_unet(unet.config, opts.sample_size, source.where())
    if opts.checkpoint:
        load_checkpoint_into(unet, opts.checkpoint)  # copies into the existing (typed) parameters
    sched_subs = (opts.scheduler_subfolder,) if opts.scheduler_subfolder is not None else ("scheduler", None)
    config = read_scheduler_config(source, sched_subs)
    overrides = {k: getattr(opts, k) for k in ("prediction_type", "beta_schedule", "beta_start", "beta_end",
                                               "num_train_timesteps") if getattr(opts, k) is not None}
    if config is None and (opts.scheduler_subfolder is not None or not overrides):
        # a default schedule would be a silent guess (a v-prediction model then gives garbage)
        asked = f"scheduler_subfolder {opts.scheduler_subfolder!r}" if opts.scheduler_subfolder is not None else \
            "scheduler/ or the root"
        raise ConfigError(f"model: {source.where()} has no scheduler_config.json in {asked}; the noise schedule is "
                          "unknown: save the pipeline's scheduler there, or give beta_schedule, beta_start, beta_end "
                          "and prediction_type")
    config = config or {}
    config.update(overrides)
    prediction_type = config.get("prediction_type", "epsilon")
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_function)
    model = DiffusersPixelModel(unet, alphas_cumprod_from_config(config), prediction_type,
                                opts.sample_size, opts.attention)
    return model.to(resolve_device(opts.device, context.device))

