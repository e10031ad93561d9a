"""Double backward through the latent model: Algorithm 1's vector-Jacobian product against finite
differences of the step map (float64), the combiner's G against it, checkpointing, kernel policy."""
from __future__ import annotations

import math

import pytest
import torch

from zmagic_core.method.combiners import DependentCombiner
from zmagic_core.contracts.components import BuildContext, DiffusionModel
from zmagic_core.method.guidance import Condition, Evaluation, GuidanceStep, evaluate
from zmagic_core.models.pretrained import MODEL_FACTORIES
from zmagic_core.models.pretrained.attention import double_backward_expected, double_backward_pass, use_math_kernel
from zmagic_core.method.solvers import DDPMSolver

from .conftest import SD_SIZE, ColorEnergy, GramEnergy, reference_image

T, T_NEXT = 500, 400


def build_sd(sd_dir, **options):
    return MODEL_FACTORIES["stable-diffusion"](BuildContext(), id=str(sd_dir), prompt="a striped painting",
                                               guidance_scale=3.0, height=SD_SIZE, width=SD_SIZE, **options)


def evaluation64(model, x, t):
    """guidance.evaluate without its float32 casts, so the whole check runs in float64."""
    x = x.detach().requires_grad_(True)
    a = float(model.alphas_cumprod[t])
    eps = model.eps(x, t)
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return Evaluation(x, t, a, eps, -eps / math.sqrt(1 - a), x0, model.decode(x0))


def conditions(model, first):
    gram = Condition("gram", GramEnergy(reference_image(SD_SIZE)).double(), "constant", 2.0)
    color = Condition("color", ColorEnergy().double(), "constant", 3.0)
    return [gram, color] if first == "energy" else [model.model_conditions()[0], gram]


@pytest.fixture(scope="module")
def model64(sd_dir):
    return build_sd(sd_dir).double()


@pytest.mark.parametrize("first", ["energy", "prompt"])
def test_vjp_of_the_step_map_matches_finite_differences(model64, first):
    model = model64
    c1, _ = conditions(model, first)
    solver = DDPMSolver()
    a, a_next = float(model.alphas_cumprod[T]), float(model.alphas_cumprod[T_NEXT])
    gen = torch.Generator().manual_seed(0)
    shape = (2, *model.sample_shape)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)  # stands for stopgrad(g_tilde)

    def f(point, create_graph):
        ev = evaluation64(model, point, T)
        _, g1 = c1.guidance(ev, create_graph=create_graph)
        out = (solver.step(ev.x, ev.score + g1, z, a, a_next) * v).sum()
        return out, ev.x

    value, leaf = f(x, True)
    (vjp,) = torch.autograd.grad(value, leaf)  # Algorithm 1 step 4, Hessian term included
    value0, leaf0 = f(x, False)  # g1 detached: the Jacobian of g1 (H_1) dropped
    (vjp_no_h,) = torch.autograd.grad(value0, leaf0)
    h = 1e-4
    gaps = []
    for _ in range(3):
        d = torch.randn(shape, generator=gen, dtype=torch.float64)
        d /= d.norm()
        with torch.enable_grad():
            fd = (f(x + h * d, False)[0] - f(x - h * d, False)[0]).item() / (2 * h)
        assert abs(fd - (vjp * d).sum().item()) <= 1e-6 * max(1.0, abs(fd)), (fd, (vjp * d).sum().item())
        gaps.append(abs(fd - (vjp_no_h * d).sum().item()))
    assert max(gaps) > 1e-3, gaps  # the check can tell: without the H_1 term it fails


@pytest.mark.parametrize("first", ["energy", "prompt"])
def test_dependent_guidance_equals_g1_plus_the_vjp(model64, first):
    """The combiner's G (float32 path of the core) equals g1 + <dPhi, g_tilde> computed in float64."""
    model = model64
    c1, c2 = conditions(model, first)
    solver = DDPMSolver()
    a, a_next = float(model.alphas_cumprod[T]), float(model.alphas_cumprod[T_NEXT])
    gen = torch.Generator().manual_seed(1)
    shape = (2, *model.sample_shape)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    z = torch.randn(shape, generator=gen, dtype=torch.float64)

    ev = evaluation64(model, x, T)
    _, g1 = c1.guidance(ev, create_graph=True)
    x_hat = solver.step(ev.x, ev.score + g1, z, a, a_next)
    ev_hat = evaluation64(model, x_hat.detach(), T_NEXT)  # level t' (the combiner's default)
    _, g_tilde = c2.guidance(ev_hat, create_graph=False)
    (g21,) = torch.autograd.grad(x_hat, ev.x, grad_outputs=g_tilde.detach())
    expected = (g1.detach() + g21).float()

    step = GuidanceStep(model, solver, [c1, c2], x.float(), T, T_NEXT, a, a_next, z.float())
    # the paper's exact update: the autograd product, no trust region
    got = DependentCombiner(hessian=True, product="autograd", bound="none", project="none").combine(step).guidance
    err = (got - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert (err < 1e-4).all(), err


def test_gradient_checkpointing_gives_the_same_guidance(sd_dir):
    plain, ckpt = build_sd(sd_dir), build_sd(sd_dir, gradient_checkpointing=True)
    assert ckpt.unet.down_blocks[1].gradient_checkpointing
    gram = Condition("gram", GramEnergy(reference_image(SD_SIZE)), "adaptive", 0.5)
    solver = DDPMSolver()
    a, a_next = float(plain.alphas_cumprod[T]), float(plain.alphas_cumprod[T_NEXT])
    x = torch.randn(1, *plain.sample_shape, generator=torch.Generator().manual_seed(2))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out = []
    for model in (plain, ckpt):
        for first in ("prompt", "energy"):
            conds = [model.model_conditions()[0], gram] if first == "prompt" else [gram, model.model_conditions()[0]]
            step = GuidanceStep(model, solver, conds, x, T, T_NEXT, a, a_next, z)
            out.append(DependentCombiner(hessian=True).combine(step).guidance)
    torch.testing.assert_close(out[0], out[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], out[3], rtol=1e-5, atol=1e-6)


def test_math_kernel_policy(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with torch.no_grad():
        assert not use_math_kernel(cpu) and not use_math_kernel(cuda)
    with torch.enable_grad():
        assert use_math_kernel(cpu)  # the fused CPU kernel has no double backward
        assert not use_math_kernel(cuda)  # first-order passes keep the fast kernels
        with double_backward_pass():
            assert use_math_kernel(cuda)
        assert not use_math_kernel(cuda, "default") and use_math_kernel(cuda, "math")

    seen = []

    class Probe(DiffusionModel):
        alphas_cumprod = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)

        def eps(self, x, t):
            seen.append(double_backward_expected())
            return x * 0.5

        def decode(self, x0):
            return x0

    for create_graph in (False, True):
        evaluate(Probe(), torch.randn(1, 3, 4, 4), 10, 0.9, [], [], create_graph=create_graph)
    assert seen == [False, True]  # read from the core's evaluate(create_graph=...)


def test_without_the_math_kernel_double_backward_fails_on_cpu(pixel_dir):
    """Why the policy exists: the fused CPU attention kernel has no double backward."""
    build = MODEL_FACTORIES["diffusers-pixel"]
    x = torch.randn(1, 3, 8, 8)
    for attention, works in (("auto", True), ("default", False)):
        model = build(BuildContext(), id=str(pixel_dir), attention=attention)
        leaf = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model.eps(leaf, 300).pow(2).sum(), leaf, create_graph=True)
        if works:
            torch.autograd.grad(g.pow(2).sum(), leaf)
        else:
            with pytest.raises(RuntimeError):
                torch.autograd.grad(g.pow(2).sum(), leaf)


def test_stable_diffusion_half_weights_keep_float32_outputs(sd_dir):
    model = build_sd(sd_dir, dtype="bfloat16")
    assert next(model.unet.parameters()).dtype == torch.bfloat16
    assert next(model.vae.parameters()).dtype == torch.bfloat16
    x = torch.randn(1, *model.sample_shape, requires_grad=True)
    eps = model.eps(x, 300)
    image = model.decode(x)
    assert eps.dtype == torch.float32 and image.dtype == torch.float32
    (g,) = torch.autograd.grad(image.pow(2).sum() + eps.pow(2).sum(), x)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    mixed = build_sd(sd_dir, dtype="bfloat16", vae_dtype="float32")
    assert next(mixed.vae.parameters()).dtype == torch.float32
