"""Algorithm 1 against explicit full Jacobians and Hessians in low dimension."""
import math

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from zmagic_core.method.combiners import CAGradCombiner, DependentCombiner, SumCombiner
from zmagic_core.method.guidance import Condition, GuidanceStep
from zmagic_core.method.schedule import Schedule, linear_alphas_cumprod
from zmagic_core.method.solvers import MATCHED_GAIN, DDIMSolver, DDPMSolver

T, T_NEXT = 500, 490
# The paper's exact update: the vector-Jacobian product by autograd, no bound on the Hessian term.
# These tests check it against explicit Jacobians and Hessians; test_fast_product.py checks the
# default (forward-difference product, bounded Hessian term) against it.
EXACT = dict(product="autograd", bound="none", project="none")


def make_step(model, solver, conditions, x, z):
    sched = Schedule(model.alphas_cumprod, 100)
    return GuidanceStep(model, solver, conditions, x, T, T_NEXT, sched.abar(T), sched.abar(T_NEXT), z)


def guidance_fn(model, cond, t, abar, gain=1.0):
    """x -> g(x) = -rho grad_x E(x0(x)) for one sample, written out here (fixed rule times the solver's
    gain), twice differentiable."""
    rho = cond.scale * math.sqrt(abar) * gain

    def g(x):
        with torch.enable_grad():
            x = x if x.requires_grad else x.clone().requires_grad_(True)
            eps = model.eps(x[None], t)[0]
            x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
            (grad,) = torch.autograd.grad(cond.energy(x0[None])[0], x, create_graph=True)
        return -rho * grad
    return g


def score_fn(model, t):
    return lambda x: model.score(x[None], t)[0]


@pytest.fixture
def setup(tiny_model, tiny_energies):
    torch.manual_seed(0)
    conds = [Condition("a", tiny_energies[0], "fixed", 2.0), Condition("b", tiny_energies[1], "fixed", 3.0)]
    x = torch.randn(1, 6)
    z = torch.randn(1, 6)
    return tiny_model, conds, x, z


def explicit_ancestral(model, conds, x, z, hessian_term=True):
    sched = Schedule(model.alphas_cumprod, 100)
    a_t, a_n = sched.abar(T), sched.abar(T_NEXT)
    beta = 1 - a_t / a_n
    g1 = guidance_fn(model, conds[0], T, a_t)
    x_hat = DDPMSolver().step(x, model.score(x, T) + g1(x[0])[None], z, a_t, a_n)
    g_tilde = guidance_fn(model, conds[1], T_NEXT, a_n)(x_hat[0].detach()).detach()
    J_s = jacobian(score_fn(model, T), x[0])
    H_1 = jacobian(g1, x[0])  # the Jacobian of g1 = grad log p(c1|x) is the Hessian of log p(c1|x)
    out = (2 - math.sqrt(1 - beta)) * g_tilde + beta * J_s.T @ g_tilde
    if hessian_term:
        out = out + beta * H_1 @ g_tilde
    return out, g1(x[0]).detach(), beta * H_1 @ g_tilde


def test_dependent_matches_explicit_jacobian_and_hessian(setup):
    model, conds, x, z = setup
    expected, g1, _ = explicit_ancestral(model, conds, x, z)
    G = DependentCombiner(hessian=True, **EXACT).combine(make_step(model, DDPMSolver(), conds, x, z)).guidance[0]
    torch.testing.assert_close(G - g1, expected, rtol=1e-4, atol=1e-5)


def test_hessian_is_symmetric_hessian_of_log_likelihood(setup):
    """H_1 from the Jacobian of g1 equals the Hessian of -rho E1(x0(x)) built by autograd.functional."""
    model, conds, x, _ = setup
    sched = Schedule(model.alphas_cumprod, 100)
    a_t = sched.abar(T)
    rho = 2.0 * math.sqrt(a_t)

    def log_lik(x):
        eps = model.eps(x[None], T)[0]
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        return -rho * conds[0].energy(x0[None])[0]

    H = hessian(log_lik, x[0])
    J = jacobian(guidance_fn(model, conds[0], T, a_t), x[0])
    torch.testing.assert_close(J, H, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(H, H.T, rtol=1e-4, atol=1e-5)


def test_no_hessian_option_drops_exactly_the_hessian_term(setup):
    model, conds, x, z = setup
    full = DependentCombiner(hessian=True, **EXACT).combine(make_step(model, DDPMSolver(), conds, x, z)).guidance[0]
    plain = DependentCombiner(hessian=False, **EXACT).combine(make_step(model, DDPMSolver(), conds, x, z)).guidance[0]
    _, _, h_term = explicit_ancestral(model, conds, x, z)
    assert h_term.norm() > 1e-3 * full.norm()  # the term is not negligible here, so the test can fail
    torch.testing.assert_close(full - plain, h_term, rtol=1e-4, atol=1e-5)
    expected_plain, g1, _ = explicit_ancestral(model, conds, x, z, hessian_term=False)
    torch.testing.assert_close(plain - g1, expected_plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pull", ["raw", "consistent", "matched"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_dependent_ddim_is_jacobian_transpose_product_of_the_step(setup, eta, pull):
    model, conds, x, z = setup
    solver = DDIMSolver(eta=eta, pull=pull)
    sched = Schedule(model.alphas_cumprod, 100)
    a_t, a_n = sched.abar(T), sched.abar(T_NEXT)
    gain = solver.guidance_gain(a_t, a_n)  # every energy's step size at this step carries it
    g1 = guidance_fn(model, conds[0], T, a_t, gain)

    def phi(x):
        return solver.step(x[None], model.score(x[None], T) + g1(x)[None], z, a_t, a_n)[0]

    x_hat = phi(x[0]).detach()
    g_tilde = guidance_fn(model, conds[1], T_NEXT, a_n, gain)(x_hat).detach()
    expected = jacobian(phi, x[0]).T @ g_tilde
    G = DependentCombiner(**EXACT).combine(make_step(model, solver, conds, x, z)).guidance[0]
    torch.testing.assert_close(G - g1(x[0]).detach(), expected, rtol=1e-4, atol=1e-5)


def test_level_t_evaluates_second_condition_at_t(setup):
    model, conds, x, z = setup
    sched = Schedule(model.alphas_cumprod, 100)
    a_t, a_n = sched.abar(T), sched.abar(T_NEXT)
    g1 = guidance_fn(model, conds[0], T, a_t)
    x_hat = DDPMSolver().step(x, model.score(x, T) + g1(x[0])[None], z, a_t, a_n)
    at_t = guidance_fn(model, conds[1], T, a_t)(x_hat[0].detach()).detach()
    at_next = guidance_fn(model, conds[1], T_NEXT, a_n)(x_hat[0].detach()).detach()
    assert (at_t - at_next).norm() > 1e-4 * at_t.norm()
    G_t = DependentCombiner(level="t", **EXACT).combine(make_step(model, DDPMSolver(), conds, x, z)).guidance[0]
    beta = 1 - a_t / a_n
    J = jacobian(lambda v: DDPMSolver().step(v[None], model.score(v[None], T) + g1(v)[None], z, a_t, a_n)[0], x[0])
    torch.testing.assert_close(G_t - g1(x[0]).detach(), J.T @ at_t, rtol=1e-4, atol=1e-5)
    assert beta > 0


def test_cagrad_pairs_are_dependent_pairs_in_both_orders(setup):
    model, conds, x, z = setup
    step = make_step(model, DDPMSolver(), conds, x, z)
    pairs, grads = CAGradCombiner(c=0.0, **EXACT).pair_gradients(step)
    assert pairs == [(0, 1), (1, 0)]
    forward = DependentCombiner(**EXACT).combine(make_step(model, DDPMSolver(), conds, x, z)).guidance
    backward = DependentCombiner(**EXACT).combine(make_step(model, DDPMSolver(), conds[::-1], x, z)).guidance
    torch.testing.assert_close(grads[0], forward, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], backward, rtol=1e-5, atol=1e-6)
    mean = CAGradCombiner(c=0.0, **EXACT).combine(make_step(model, DDPMSolver(), conds, x, z)).guidance
    torch.testing.assert_close(mean, (forward + backward) / 2, rtol=1e-5, atol=1e-6)


def test_sum_is_sum_of_guidance_terms(setup):
    model, conds, x, z = setup
    sched = Schedule(model.alphas_cumprod, 100)
    a_t = sched.abar(T)
    expected = sum(guidance_fn(model, c, T, a_t)(x[0]).detach() for c in conds)
    G = SumCombiner().combine(make_step(model, DDPMSolver(), conds, x, z)).guidance[0]
    torch.testing.assert_close(G, expected, rtol=1e-5, atol=1e-6)


def test_cap_bounds_the_conditional_term_and_none_is_the_paper(setup):
    model, conds, x, z = setup
    sched = Schedule(model.alphas_cumprod, 100)
    a_t, a_n = sched.abar(T), sched.abar(T_NEXT)
    g1 = guidance_fn(model, conds[0], T, a_t)(x[0]).detach()
    x_hat = DDPMSolver().step(x, model.score(x, T) + g1[None], z, a_t, a_n)
    g_tilde = guidance_fn(model, conds[1], T_NEXT, a_n)(x_hat[0].detach()).detach()
    free = DependentCombiner(**EXACT).combine(make_step(model, DDPMSolver(), conds, x, z)).guidance[0] - g1
    ratio = float(free.norm() / g_tilde.norm())
    loose = DependentCombiner(cap=2 * ratio, **EXACT).combine(make_step(model, DDPMSolver(), conds, x, z)).guidance[0] - g1
    torch.testing.assert_close(loose, free)  # a cap above the actual ratio changes nothing
    tight = DependentCombiner(cap=0.5 * ratio, **EXACT).combine(make_step(model, DDPMSolver(), conds, x, z)).guidance[0] - g1
    torch.testing.assert_close(tight, 0.5 * free, rtol=1e-5, atol=1e-6)  # same direction, half the length


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_guidance_gain_makes_the_pull_that_of_the_ancestral_step(eta):
    """dPhi/dscore of DDIM times its 'consistent' gain equals the ancestral step's beta_eff, so one scale moves
    x_t' equally under both; 'raw' keeps DDIM's own coefficient; small deterministic steps give about 2;
    'matched' (the default) is MATCHED_GAIN at eta = 0 and moves to 'consistent' with the step's noise."""
    sched = Schedule(linear_alphas_cumprod(), 50)
    ddim, raw = DDIMSolver(eta=eta, pull="consistent"), DDIMSolver(eta=eta, pull="raw")
    matched = DDIMSolver(eta=eta)
    x, z, g = torch.randn(3, 1, 6, dtype=torch.float64).unbind(0)
    for _, t, t_next in sched.pairs():
        a_t, a_n = sched.abar(t), sched.abar(t_next)
        moved = (ddim.step(x, g, z, a_t, a_n) - ddim.step(x, torch.zeros_like(g), z, a_t, a_n))
        torch.testing.assert_close(moved, ddim.score_coefficient(a_t, a_n) * g)
        if t_next >= 0:  # the final step ends on x0 either way
            torch.testing.assert_close(moved * ddim.guidance_gain(a_t, a_n), Schedule.beta_eff(a_t, a_n) * g)
            sigma = float((ddim.step(x, g, z, a_t, a_n) - ddim.step(x, g, torch.zeros_like(z), a_t, a_n)).norm() / z.norm())
            nu = min(sigma / Schedule.beta_eff(a_t, a_n) ** 0.5, 1.0)
            want = MATCHED_GAIN + (ddim.guidance_gain(a_t, a_n) - MATCHED_GAIN) * nu
            assert matched.guidance_gain(a_t, a_n) == pytest.approx(want, rel=1e-6)
        assert raw.guidance_gain(a_t, a_n) == 1.0
    if eta == 0.0:
        assert matched.guidance_gain(0.5, 0.6) == MATCHED_GAIN
    fine = Schedule(linear_alphas_cumprod(), 1000)
    assert 1.95 < DDIMSolver(pull="consistent").guidance_gain(fine.abar(500), fine.abar(499)) < 2.0
