"""Pretrained base models through diffusers; diffusers is imported only when one is built.

MODEL_FACTORIES maps a model kind to its factory (and options model):

* ``diffusers-pixel``: any diffusers UNet2DModel with its scheduler config
  (default ``google/ddpm-ema-celebahq-256``); see :mod:`.pixel`.
* ``stable-diffusion``: UNet2DConditionModel + AutoencoderKL + CLIP text encoder, the prompt as
  the first condition (default ``CompVis/stable-diffusion-v1-4``); see :mod:`.stable_diffusion`.
"""
from zmagic_core.models.pretrained.pixel import DiffusersPixelOptions, build_diffusers_pixel
from zmagic_core.models.pretrained.stable_diffusion import (StableDiffusionOptions, build_stable_diffusion,
                                                           prompt_conditions)

MODEL_FACTORIES: dict = {
    "diffusers-pixel": build_diffusers_pixel,
    "stable-diffusion": build_stable_diffusion,
}
