"""Full guided runs of both model kinds under sum, dependent and cagrad, against unguided runs."""
from __future__ import annotations

import pytest
import torch

from zmagic_core.method.combiners import CAGradCombiner, DependentCombiner, SumCombiner
from zmagic_core.contracts.components import BuildContext
from zmagic_core.method.guidance import Condition
from zmagic_core.models.pretrained import MODEL_FACTORIES
from zmagic_core.sampling.pipeline import Pipeline
from zmagic_core.method.solvers import DDIMSolver, DDPMSolver

from .conftest import SD_SIZE, ColorEnergy, GramEnergy, reference_image, tame

SEEDS = [0, 1]
COMBINERS = {"sum": SumCombiner, "dependent": lambda: DependentCombiner(hessian=True),
             "cagrad": lambda: CAGradCombiner(c=0.5)}


def final_energies(images, energies):
    with torch.no_grad():
        return torch.stack([e(images) for e in energies]).sum(0)


@pytest.fixture(scope="module")
def pixel_model(pixel_dir):
    return tame(MODEL_FACTORIES["diffusers-pixel"](BuildContext(), id=str(pixel_dir)))


@pytest.fixture(scope="module")
def sd_model(sd_dir):
    model = MODEL_FACTORIES["stable-diffusion"](BuildContext(), id=str(sd_dir), prompt="a striped painting",
                                                guidance_scale=3.0, height=SD_SIZE, width=SD_SIZE)
    return tame(model)


@pytest.mark.parametrize("combiner", list(COMBINERS))
def test_pixel_guided_run_lowers_the_energy(pixel_model, combiner):
    energies = [GramEnergy(reference_image(8)), ColorEnergy()]
    conds = [Condition("gram", energies[0], "adaptive", 0.5), Condition("color", energies[1], "adaptive", 0.5)]
    solver = DDPMSolver()
    base = Pipeline(pixel_model, solver, SumCombiner(), [], steps=8).run(SEEDS, batch_size=2, progress=False)
    run = Pipeline(pixel_model, solver, COMBINERS[combiner](), conds, steps=8).run(SEEDS, batch_size=2,
                                                                                  progress=False)
    assert not run.errors and run.images.shape == (2, 3, 8, 8)
    assert torch.isfinite(run.images).all()
    e_base, e_run = final_energies(base.images, energies), final_energies(run.images, energies)
    assert e_run.mean() < e_base.mean(), (e_run, e_base)
    if combiner == "dependent":
        assert "cos(g1,g2|1)" in run.trace[0][0]


@pytest.mark.parametrize("combiner", list(COMBINERS))
def test_stable_diffusion_guided_run_lowers_the_energy(sd_model, combiner):
    energy = GramEnergy(reference_image(SD_SIZE))
    conds = [Condition("style", energy, "adaptive", 0.5)]
    solver = DDIMSolver(0.0)
    # unguided by the energy: the prompt alone (plain classifier-free guidance)
    base = Pipeline(sd_model, solver, SumCombiner(), [], steps=8).run(SEEDS, batch_size=2, progress=False)
    run = Pipeline(sd_model, solver, COMBINERS[combiner](), conds, steps=8).run(SEEDS, batch_size=2,
                                                                               progress=False)
    assert run.condition_names == ["prompt", "style"]
    assert not run.errors and run.samples.shape == (2, *sd_model.sample_shape)
    assert run.images.shape == (2, 3, SD_SIZE, SD_SIZE)
    e_base, e_run = final_energies(base.images, [energy]), final_energies(run.images, [energy])
    assert e_run.mean() < e_base.mean(), (e_run, e_base)


def test_prompt_condition_alone_is_classifier_free_guidance(sd_model):
    """sum with only the prompt = DDIM with eps_uncond + w (eps_cond - eps_uncond)."""
    import math

    from zmagic_core.method.schedule import Schedule

    steps = 5
    run = Pipeline(sd_model, DDIMSolver(0.0), SumCombiner(), [], steps=steps).run([3], progress=False)
    sched = Schedule(sd_model.alphas_cumprod, steps)
    x = torch.randn((1, *sd_model.sample_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for _, t, t_next in sched.pairs():
            a, a_next = sched.abar(t), sched.abar(t_next)
            eps = sd_model.eps_cfg(x, t)
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    torch.testing.assert_close(run.samples, x, rtol=1e-4, atol=1e-4)


def test_cfg_clean_estimate_option(sd_dir):
    """clean_estimate: cfg -> energies decode (x - sqrt(1-a) eps_cfg) / sqrt(a); final images unchanged."""
    import math

    from zmagic_core.method.guidance import evaluate

    kw = dict(id=str(sd_dir), prompt="a striped painting", guidance_scale=3.0, height=SD_SIZE, width=SD_SIZE)
    model = MODEL_FACTORIES["stable-diffusion"](BuildContext(), clean_estimate="cfg", **kw)
    plain = MODEL_FACTORIES["stable-diffusion"](BuildContext(), **kw)
    prompt = model.model_conditions()[0]
    energy = GramEnergy(reference_image(SD_SIZE))
    style = Condition("style", energy, "adaptive", 0.5)
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(4))
    t = 600
    a = float(model.alphas_cumprod[t])
    ev = evaluate(model, x, t, a, [prompt, style], [True, True])
    with torch.no_grad():
        x0_cfg = (x - math.sqrt(1 - a) * model.eps_cfg(x, t)) / math.sqrt(a)
        torch.testing.assert_close(ev.image, model.decode(x0_cfg), rtol=1e-4, atol=1e-5)
    ev_plain = evaluate(plain, x, t, a, [plain.model_conditions()[0]], [True])
    torch.testing.assert_close(ev.grads[0], ev_plain.grads[0], rtol=1e-4, atol=1e-5)  # the prompt's g is the same
    assert not torch.allclose(ev.grads[1], evaluate(plain, x, t, a, [style], [True]).grads[0])
    run = Pipeline(tame(model), DDIMSolver(0.0), DependentCombiner(), [style], steps=4).run([0], progress=False)
    assert not run.errors and run.images.shape == (1, 3, SD_SIZE, SD_SIZE)


def test_predict_is_one_call_with_no_state_between_calls(sd_dir):
    """predict() returns eps and the clean estimate together; decode() and eps() keep no state, so
    the order of calls (or calls in between) cannot change what guidance sees."""
    import math

    kw = dict(id=str(sd_dir), prompt="a striped painting", guidance_scale=3.0, height=SD_SIZE, width=SD_SIZE)
    model = MODEL_FACTORIES["stable-diffusion"](BuildContext(), clean_estimate="cfg", **kw)
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(7))
    t = 400
    a = float(model.alphas_cumprod[t])
    with torch.no_grad():
        eps_u, eps_c = model.eps(x, t), model.eps_cond(x, t)
        x0_cfg = (x - math.sqrt(1 - a) * (eps_u + 3.0 * (eps_c - eps_u))) / math.sqrt(a)
        image_before = model.decode(x0_cfg)
    with torch.enable_grad():  # guidance passes run with grad on: that is when the CFG estimate is built
        first = model.predict(x, t)
        model.eps(torch.randn_like(x), 900)  # an unrelated call in between
        model.decode(torch.randn_like(x))
        second = model.predict(x, t)
    for p in (first, second):
        torch.testing.assert_close(p.eps, eps_u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.x0, x0_cfg, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p.extras["eps_cond"], eps_c, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(x0_cfg), image_before)  # decode is a pure function
        plain = model.predict(x, t)  # no grad: a final-image pass, no conditional pass
    assert plain.extras == {}
    torch.testing.assert_close(plain.x0, (x - math.sqrt(1 - a) * eps_u) / math.sqrt(a), rtol=1e-4, atol=1e-5)
