"""The forward-difference product on a tiny diffusers UNet (random weights) against autograd.

The difference gives J_Phi g_tilde, the directional derivative of the step map; Algorithm 1 asks for
J_Phi^T g_tilde.  They agree when eps is the gradient field of a log density (a trained score
network nearly is); a random network's Jacobian is not symmetric, so the check is split: the
difference against autograd's Jacobian-vector product (the numerics of the difference), and, on a
network made a sensible denoiser (``tame``: the exact eps of Gaussian data plus a small network
part), against the exact vector-Jacobian product the paper's update uses.
"""
from __future__ import annotations

import pytest
import torch

from zmagic_core.contracts.components import BuildContext
from zmagic_core.method.combiners import DependentCombiner
from zmagic_core.method.guidance import Condition, GuidanceStep, evaluate
from zmagic_core.method.schedule import Schedule
from zmagic_core.method.solvers import DDPMSolver
from zmagic_core.models.pretrained import MODEL_FACTORIES

from .conftest import ColorEnergy, GramEnergy, reference_image, tame

EXACT = dict(product="autograd", bound="none", project="none")
FAST = dict(product="difference", bound="none", project="none")


def relative_error(got, want):
    return (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)


def setting(model, t, seed=0, batch=3):
    size = model.sample_shape[-1]
    conds = [Condition("gram", GramEnergy(reference_image(size)), "adaptive", 0.5),
             Condition("color", ColorEnergy(), "adaptive", 0.5)]
    sched = Schedule(model.alphas_cumprod, 100)
    a, a_next = sched.abar(t), sched.abar(t - 10)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.sample_shape, generator=gen)
    z = torch.randn(batch, *model.sample_shape, generator=gen)
    return conds, (lambda: GuidanceStep(model, DDPMSolver(), conds, x, t, t - 10, a, a_next, z))


def conditional_term(combiner, step):
    return combiner.combine(step()).guidance - step().base().grads[0]


@pytest.fixture(scope="module")
def pixel(pixel_dir):
    return MODEL_FACTORIES["diffusers-pixel"](BuildContext(), id=str(pixel_dir))


@pytest.mark.parametrize("t", [600, 300, 100])
def test_difference_is_the_directional_derivative_of_the_step_map(pixel, t):
    """Against autograd's exact J_Phi g_tilde (a Jacobian-vector product by the double-VJP trick)."""
    conds, step = setting(pixel, t)
    s = step()
    ev = evaluate(pixel, s.x, t, s.abar_t, conds[:1], [True], create_graph=True)
    x_hat = s.phi(ev.x, ev.score + ev.grads[0])
    tilde = s.evaluate(x_hat.detach(), "t_next", [1]).grads[0].detach()
    u = torch.zeros_like(x_hat, requires_grad=True)
    (vjp,) = torch.autograd.grad(x_hat, ev.x, u, create_graph=True)
    (jvp,) = torch.autograd.grad(vjp, u, tilde)
    fast = conditional_term(DependentCombiner(**FAST), step)
    assert (relative_error(fast, jvp) < 1e-2).all(), relative_error(fast, jvp)


@pytest.mark.parametrize("t", [600, 300, 100])
def test_difference_matches_the_exact_vjp_on_a_denoiser(pixel_dir, t):
    model = tame(MODEL_FACTORIES["diffusers-pixel"](BuildContext(), id=str(pixel_dir)), mix=MIX)
    _, step = setting(model, t)
    exact = conditional_term(DependentCombiner(**EXACT), step)
    fast = conditional_term(DependentCombiner(**FAST), step)
    assert (relative_error(fast, exact) < 1e-2).all(), relative_error(fast, exact)


MIX = 0.05  # the network part of the denoiser: a random network is not a gradient field (its J is ~3 % asymmetric)
