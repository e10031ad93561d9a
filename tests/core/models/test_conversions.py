"""Prediction types -> eps, and the Tweedie clean estimate, against diffusers' own schedulers."""
from __future__ import annotations

import math

import pytest
import torch

from zmagic_core.models.pretrained.pixel import DiffusersPixelModel
from zmagic_core.method.predictions import alphas_cumprod_from_config
from zmagic_core.method.solvers import DDIMSolver

from .conftest import PIXEL_UNET


@pytest.mark.parametrize("schedule", [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
])
def test_alphas_cumprod_match_the_scheduler(schedule):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**schedule)
    ours = alphas_cumprod_from_config(dict(sched.config))
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours.float(), sched.alphas_cumprod, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eps_and_clean_estimate_agree_with_ddim_step(prediction_type):
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**PIXEL_UNET)
    sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(10)  # 900, 800, ..., 0
    model = DiffusersPixelModel(unet, alphas_cumprod_from_config(dict(sched.config)), prediction_type)
    x = torch.randn(2, 3, 8, 8)
    for t in (900, 500, 100):
        with torch.no_grad():
            out = unet(x, t).sample
            eps = model.eps(x, t)
        abar = float(model.alphas_cumprod[t])
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)  # what guidance.evaluate computes
        ref = sched.step(out, t, x, eta=0.0)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-4, atol=1e-4)
        # the DDIM map in score form (zmagic's solver) lands where diffusers' DDIM step does
        abar_prev = float(sched.alphas_cumprod[t - 100]) if t >= 100 else float(sched.final_alpha_cumprod)
        x_prev = DDIMSolver(0.0).step(x, -eps / math.sqrt(1 - abar), torch.zeros_like(x), abar, abar_prev)
        torch.testing.assert_close(x_prev, ref.prev_sample, rtol=1e-4, atol=1e-4)


def test_learned_variance_channels_are_dropped():
    from diffusers import UNet2DModel

    unet = UNet2DModel(**{**PIXEL_UNET, "out_channels": 6})
    model = DiffusersPixelModel(unet, alphas_cumprod_from_config({}), "epsilon")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eps(x, 10), unet(x, 10).sample[:, :3])


def test_prediction_type_is_read_from_the_saved_scheduler(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from zmagic_core.contracts.components import BuildContext
    from zmagic_core.models.pretrained import MODEL_FACTORIES

    torch.manual_seed(0)
    unet = UNet2DModel(**PIXEL_UNET)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(prediction_type="v_prediction")).save_pretrained(tmp_path)
    model = MODEL_FACTORIES["diffusers-pixel"](BuildContext(), id=str(tmp_path))
    assert model.prediction_type == "v_prediction"
    x = torch.randn(1, 3, 8, 8)
    a = float(model.alphas_cumprod[250])
    with torch.no_grad():
        expected = math.sqrt(a) * unet(x, 250).sample + math.sqrt(1 - a) * x
        torch.testing.assert_close(model.eps(x, 250), expected, rtol=1e-5, atol=1e-6)
    override = MODEL_FACTORIES["diffusers-pixel"](BuildContext(), id=str(tmp_path), prediction_type="epsilon")
    assert override.prediction_type == "epsilon"
