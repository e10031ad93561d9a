"""Model kind ``stable-diffusion-xl``: SDXL (UNet2DConditionModel with two CLIP text encoders and
added conditioning, AutoencoderKL), the prompt as the first condition exactly as ``stable-diffusion``.

What differs from :mod:`.stable_diffusion` (whose model, prompt condition and loading it reuses):

* Text inputs, as diffusers' StableDiffusionXLPipeline computes them: the penultimate hidden states
  of CLIPTextModel (768) and CLIPTextModelWithProjection (1280) concatenated (2048 features), and
  ``text_embeds`` = the projected pooled output of encoder 2.  Without a negative prompt, SDXL
  folders whose model_index.json sets ``force_zeros_for_empty_prompt`` (the base model does) use
  zeros for the unconditional branch, as the pipeline does.
* Added conditioning ``time_ids`` = (original height, width, crop top, left, target height, width),
  the same for both branches.
* The VAE: SDXL's decoder overflows in float16 (its config sets ``force_upcast``), so with
  dtype float16 it is kept in float32 unless ``vae_dtype`` says otherwise or a fixed VAE whose
  config clears force_upcast is given as ``vae`` (e.g. madebyollin/sdxl-vae-fp16-fix).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Optional

import torch
from pydantic import Field

from zmagic_core.contracts.components import BuildContext
from zmagic_core.contracts.errors import ConfigError
from zmagic_core.contracts.options import PathOrName
from zmagic_core.models.pretrained.loading import resolve_source
from zmagic_core.models.pretrained.stable_diffusion import (PromptEncoder, StableDiffusionModel, StableDiffusionOptions,
                                                           assemble_latent_model, load_latent_parts)

DEFAULT_SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_TEXT_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
SDXL_LOADING_OPTIONS = ("vae",)  # beside stable_diffusion.LOADING_OPTIONS


class StableDiffusionXLModel(StableDiffusionModel):
    """SDXL eps(x_t, t): the unconditional branch's prediction; the prompt enters as PromptCondition."""

    text_keys: ClassVar[tuple[str, ...]] = ("embedding", "pooled")

    def __init__(self, *args, time_ids: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("time_ids", time_ids.reshape(1, -1).float())
        expected = self.unet.add_embedding.linear_1.in_features
        given = self.unet.config.addition_time_embed_dim * self.time_ids.shape[1] + self.uncond_pooled.shape[-1]
        if given != expected:
            raise ConfigError(f"the UNet's added embedding takes {expected} features, but {self.time_ids.shape[1]} "
                              f"time ids and a pooled text embedding of {self.uncond_pooled.shape[-1]} give "
                              f"{given}: the text encoder 2 does not belong to this UNet")

    def _unet_inputs(self, branch: str, batch: int) -> dict:
        inputs = super()._unet_inputs(branch, batch)
        pooled = getattr(self, f"{branch}_pooled").to(self.weight_dtype)
        inputs["added_cond_kwargs"] = {"text_embeds": pooled.expand(batch, -1),
                                       "time_ids": self.time_ids.to(self.weight_dtype).expand(batch, -1)}
        return inputs


class StableDiffusionXLOptions(StableDiffusionOptions):
    id: PathOrName = Field(DEFAULT_SDXL_ID, description="hub id or local folder (diffusers SDXL layout: unet/ vae/ "
                                                        "text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/)")
    negative_prompt: Optional[str] = Field(
        None, description="prompt of the 'unconditional' branch; none: zeros where the folder sets "
                          "force_zeros_for_empty_prompt (SDXL base), else the empty prompt")
    height: int = Field(1024, ge=16, multiple_of=8)
    width: int = Field(1024, ge=16, multiple_of=8)
    vae: Optional[PathOrName] = Field(
        None, description="a separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix: decodes in float16")
    original_size: Optional[tuple[int, int]] = Field(None, description="time id (height, width); default: the image size")
    crops_coords_top_left: tuple[int, int] = Field((0, 0), description="time id (top, left) of the crop")
    target_size: Optional[tuple[int, int]] = Field(None, description="time id (height, width); default: the image size")


def sdxl_time_ids(opts) -> torch.Tensor:
    """original size + crop top-left + target size, as StableDiffusionXLPipeline._get_add_time_ids."""
    size = (opts.height, opts.width)
    return torch.tensor([*(opts.original_size or size), *opts.crops_coords_top_left, *(opts.target_size or size)],
                        dtype=torch.float32)


def _force_zeros(source) -> bool:
    """model_index.json's force_zeros_for_empty_prompt (the pipeline's default, True, when unreadable)."""
    try:
        if source.local:
            index = json.loads((Path(source.root) / "model_index.json").read_text())
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source.root, "model_index.json", revision=source.revision)
            index = json.loads(Path(cached).read_text()) if isinstance(cached, str) else {}
    except (OSError, ValueError):
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True))


def build_sdxl(context: BuildContext, **options) -> StableDiffusionXLModel:
    """SDXL with the prompt as the first condition and classifier-free guidance as ``stable-diffusion``."""
    opts = StableDiffusionXLOptions(**options)
    vae_source = resolve_source(opts.vae, local_files_only=opts.local_files_only) if opts.vae else None
    parts, device = load_latent_parts("stable-diffusion-xl", opts, context, SDXL_TEXT_PARTS, vae_source)
    parts["force_zeros_for_empty_prompt"] = _force_zeros(resolve_source(opts.id, opts.path, opts.revision,
                                                                        opts.local_files_only))
    if opts.vae_dtype is None and parts["vae"].dtype == torch.float16 and parts["vae"].config.force_upcast:
        parts["vae"].to(torch.float32)  # SDXL's decoder overflows in float16
    return sdxl_from_components(parts, opts, device)


def sdxl_from_components(parts: dict, opts: StableDiffusionXLOptions, device: torch.device,
                         move_modules: bool = True) -> StableDiffusionXLModel:
    """The ``stable-diffusion-xl`` model from loaded components (unet, vae, tokenizer, tokenizer_2,
    text_encoder, text_encoder_2, "scheduler_config", "force_zeros_for_empty_prompt")."""
    missing = [name for name in ("unet", "vae", *SDXL_TEXT_PARTS) if parts.get(name) is None]
    if missing:
        raise ConfigError(f"stable-diffusion-xl needs both text encoders and tokenizers; missing: {', '.join(missing)} "
                          f"(an SDXL refiner, which has only text_encoder_2, is not supported)")
    encoder = PromptEncoder([parts["tokenizer"], parts["tokenizer_2"]], [parts["text_encoder"], parts["text_encoder_2"]],
                            penultimate=True, zeros_for_empty=parts.get("force_zeros_for_empty_prompt", True))
    return assemble_latent_model(StableDiffusionXLModel, parts, encoder, opts, device, move_modules,
                                 time_ids=sdxl_time_ids(opts))
