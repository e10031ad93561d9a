"""Real base models (diffusers); the shapes world lives in zmagic_core.shapes.

MODEL_FACTORIES maps a model kind to its factory; diffusers is imported only when one is built.

* ``diffusers-pixel``: any diffusers UNet2DModel with its scheduler config
  (default ``google/ddpm-ema-celebahq-256``); see :mod:`.diffusers_pixel`.
* ``stable-diffusion``: UNet2DConditionModel + AutoencoderKL + CLIP text encoder, the prompt as
  the first condition (default ``CompVis/stable-diffusion-v1-4``); see :mod:`.stable_diffusion`.
"""
from .diffusers_pixel import build_diffusers_pixel
from .stable_diffusion import build_stable_diffusion

MODEL_FACTORIES: dict = {
    "diffusers-pixel": build_diffusers_pixel,
    "stable-diffusion": build_stable_diffusion,
}
