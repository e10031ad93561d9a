"""A complete third-party zmagic plugin in one file: the condition "mean brightness = target"."""
import torch
from pydantic import BaseModel, ConfigDict, Field

from zmagic_core import Energy, hookimpl


class BrightnessOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: float = Field(..., ge=-1.0, le=1.0, description="wanted mean pixel value, in [-1, 1]")


class BrightnessEnergy(Energy):
    """E = |mean(image) - target|: zero when the image has the wanted brightness."""

    def __init__(self, target: float):
        super().__init__()
        self.target = target

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.mean(dim=(1, 2, 3)) - self.target).abs()


def build_brightness(context, **options):
    """Factory: called with the run's BuildContext and the recipe's options."""
    return BrightnessEnergy(**options).to(context.device)



@hookimpl
def register_energies(register):
    # options: checked before anything loads (a bad recipe fails naming the field)
    register("brightness", build_brightness, options=BrightnessOptions, aliases=("mean-brightness",))
