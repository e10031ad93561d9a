"""Pretrained base models through diffusers; diffusers is imported only when one is built.

MODEL_FACTORIES maps a model kind to its factory (and options model):

* ``diffusers-pixel``: any diffusers UNet2DModel with its scheduler config
  (default ``google/ddpm-ema-celebahq-256``); see :mod:`.pixel`.
* ``stable-diffusion``: UNet2DConditionModel + AutoencoderKL + CLIP text encoder, the prompt as
  the first condition (default ``CompVis/stable-diffusion-v1-4``); see :mod:`.stable_diffusion`.
* ``flow-transformer``: SD3 / SD3.5 and FLUX flow-matching transformers as VP models, the prompt as
  the first condition (CFG or distilled guidance); see :mod:`.flow_transformer`.
* ``stable-diffusion-xl``: SDXL (two text encoders, added conditioning), the prompt as the first
  condition (default ``stabilityai/stable-diffusion-xl-base-1.0``); see :mod:`.sdxl`.
"""
from zmagic_core.models.pretrained.flow_transformer import FlowTransformerOptions, build_flow_transformer
from zmagic_core.models.pretrained.pixel import DiffusersPixelOptions, build_diffusers_pixel
from zmagic_core.models.pretrained.stable_diffusion import (StableDiffusionOptions, build_stable_diffusion,
                                                           prompt_conditions)
from zmagic_core.models.pretrained.sdxl import StableDiffusionXLOptions, build_sdxl

MODEL_FACTORIES: dict = {
    "diffusers-pixel": build_diffusers_pixel,
    "stable-diffusion": build_stable_diffusion,
    "flow-transformer": build_flow_transformer,
    "stable-diffusion-xl": build_sdxl,
}
