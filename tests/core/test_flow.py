"""Flow matching as VP in rescaled coordinates (method/flow.py) and the flow-matching shapes world,
against explicit algebra, full Jacobians in low dimension and an independent log density."""
import math
from pathlib import Path

import pytest
import torch
from torch.autograd.functional import jacobian

from zmagic_core.assembly.build import build_pipeline, load_recipe
from zmagic_core.contracts.errors import ConfigError
from zmagic_core.method.combiners import DependentCombiner, SumCombiner
from zmagic_core.method.flow import (FlowModel, eps_from_velocity, euler_step, exponential_shift, flow_abar,
                                     flow_alphas_cumprod, flow_sigmas, shift_sigmas, sigma_from_abar,
                                     velocity_from_score, vp_scale, x0_from_velocity)
from zmagic_core.method.guidance import Condition, GuidanceStep
from zmagic_core.method.predictions import score_from_eps
from zmagic_core.method.schedule import Schedule
from zmagic_core.method.solvers import DDIMSolver, DDPMSolver
from zmagic_core.models.shapes import AttributeEnergy, MaskEnergy, ShapesFlowModel, ShapesModel
from zmagic_core.models.shapes.evaluate import (ShapesEvaluator, evaluate_samples, nearest_prototypes,
                                                target_distribution, target_log_weights, tv_distance)
from zmagic_core.sampling.pipeline import Pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "shapes"
SIGMAS = (0.02, 0.3, 0.55, 0.8, 0.97)
EXACT = dict(product="autograd", bound="none", project="none")  # the exact vector-Jacobian product, as in test_dependent.py


class TinyFlow(FlowModel):
    """A nonlinear velocity field in 5 dimensions (float64): v = tanh(W x) + s x."""

    def __init__(self, dim: int = 5):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.register_buffer("W", torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        self.register_buffer("alphas_cumprod", flow_alphas_cumprod(1000))
        self.sample_shape = (dim,)

    def velocity(self, x_flow, t, sigma):
        return torch.tanh(x_flow @ self.W.T) + sigma * x_flow


# -- (a) the conversions, the Euler step and its Jacobian --------------------------------------------
@pytest.mark.parametrize("s", SIGMAS)
def test_conversions_match_the_path_algebra(s):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    x_s, v = (1 - s) * x0 + s * eps, eps - x0
    abar = flow_abar(s)
    torch.testing.assert_close(vp_scale(s) * x_s, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps)
    assert abs(sigma_from_abar(abar) - s) < 1e-12
    assert abs(vp_scale(s) - 1 / math.hypot(1 - s, s)) < 1e-15
    torch.testing.assert_close(eps_from_velocity(v, x_s, s), eps)
    torch.testing.assert_close(x0_from_velocity(v, x_s, s), x0)
    torch.testing.assert_close(velocity_from_score(-eps / s, x_s, s), v)  # score = -eps / s on the path


def test_schedule_and_shifts():
    s = flow_sigmas(1000)
    torch.testing.assert_close(s[:-1], torch.arange(1, 1000, dtype=torch.float64) / 1000)
    assert s[-1] < 1  # capped: the clean estimate at s = 1 is 0/0
    assert abs(float(shift_sigmas(torch.tensor(0.5), 3.0)) - 0.75) < 1e-7
    torch.testing.assert_close(exponential_shift(s, 0.0), s)
    abar = flow_alphas_cumprod(1000, shift=3.0)
    assert (abar.diff() < 0).all() and abar.dtype == torch.float64
    torch.testing.assert_close(abar, flow_abar(flow_sigmas(1000, 3.0)))
    model = TinyFlow()
    for t in (0, 250, 999):
        assert abs(model.sigma(t) - float(flow_sigmas(1000)[t])) < 1e-9


def test_prediction_is_tweedie_at_the_vp_point():
    model, t = TinyFlow(), 400
    abar, k = float(model.alphas_cumprod[t]), vp_scale(model.sigma(t))
    x_vp = torch.randn(3, 5, dtype=torch.float64)
    p = model.predict(x_vp, t)
    torch.testing.assert_close(p.x0, (x_vp - math.sqrt(1 - abar) * p.eps) / math.sqrt(abar))
    v = model.velocity(x_vp / k, t, model.sigma(t))
    torch.testing.assert_close(p.eps - p.x0, v)  # the velocity is eps - x0, whatever the coordinates


def flow_and_ddim_maps(model, t, t_next):
    """(F, D, s, s'): the flow Euler map on x_s and the DDIM(eta=0) map on x_vp for the same step."""
    s, s_next = model.sigma(t), model.sigma(t_next)
    abar, abar_next = float(model.alphas_cumprod[t]), float(model.alphas_cumprod[t_next])
    z = torch.zeros(5, dtype=torch.float64)

    def F(x_s):
        return euler_step(x_s, model.velocity(x_s, t, s), s, s_next)

    def D(x_vp):
        return DDIMSolver(eta=0.0).step(x_vp, score_from_eps(model.eps(x_vp, t), abar), z, abar, abar_next)
    return F, D, s, s_next


@pytest.mark.parametrize("t, t_next", [(980, 960), (500, 480), (40, 20)])
def test_euler_step_is_ddim_in_vp_coordinates(t, t_next):
    model = TinyFlow()
    F, D, s, s_next = flow_and_ddim_maps(model, t, t_next)
    x_s = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(D(vp_scale(s) * x_s) / vp_scale(s_next), F(x_s))


@pytest.mark.parametrize("t, t_next", [(980, 960), (500, 480), (40, 20)])
def test_euler_jacobian_is_ddim_jacobian_rescaled(t, t_next):
    """F(x_s) = D(k x_s) / k'  =>  dF/dx_s = (k / k') dD/dx_vp at x_vp = k x_s."""
    model = TinyFlow()
    F, D, s, s_next = flow_and_ddim_maps(model, t, t_next)
    k, k_next = vp_scale(s), vp_scale(s_next)
    x_s = torch.randn(5, dtype=torch.float64)
    J_F = jacobian(F, x_s)
    J_D = jacobian(D, k * x_s)
    assert (J_F - torch.eye(5, dtype=torch.float64)).norm() > 1e-3  # the step is not the identity
    torch.testing.assert_close(J_F, k / k_next * J_D, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t, t_next", [(900, 880), (500, 480), (60, 40)])
def test_guided_velocity_is_the_guided_vp_step(t, t_next):
    """A guidance term G_vp on the VP score is G_flow = k G_vp on the flow score, and the velocity
    moves by -s / (1 - s) G_flow: both give the same next point."""
    model = TinyFlow()
    s, s_next = model.sigma(t), model.sigma(t_next)
    abar, abar_next = float(model.alphas_cumprod[t]), float(model.alphas_cumprod[t_next])
    k, k_next = vp_scale(s), vp_scale(s_next)
    x_s, G_vp = torch.randn(2, 3, 5, dtype=torch.float64)
    v = model.velocity(x_s, t, s)
    score_flow = -eps_from_velocity(v, x_s, s) / s  # = k * score_vp
    v_g = velocity_from_score(score_flow + k * G_vp, x_s, s)
    torch.testing.assert_close(v_g, v - s / (1 - s) * k * G_vp)
    vp_next = DDIMSolver(eta=0.0).step(k * x_s, score_from_eps(model.eps(k * x_s, t), abar) + G_vp,
                                       torch.zeros_like(x_s), abar, abar_next)
    torch.testing.assert_close(vp_next / k_next, euler_step(x_s, v_g, s, s_next))


# -- (b) the flow shapes world's exact velocity ------------------------------------------------------
def independent_log_density(world, x_s, s):
    """log p_s(x_s) of the mixture on the flow path, by torch.distributions (float64)."""
    var = (1 - s) ** 2 * world.sigma0**2 + s**2
    mix = torch.distributions.Categorical(logits=world.log_weights.double())
    comp = torch.distributions.Independent(
        torch.distributions.Normal((1 - s) * world.mu.double(), torch.full_like(world.mu.double(), math.sqrt(var))), 1)
    return torch.distributions.MixtureSameFamily(mix, comp).log_prob(x_s)


def near_the_mixture(world, s, n=3, seed=0):
    """Flow points x_s = (1 - s) x0 + s eps with x0 near a few prototypes (float64, flat)."""
    gen = torch.Generator().manual_seed(seed)
    ks = torch.randint(len(world.prototypes), (n,), generator=gen)
    x0 = world.mu.double()[ks] + world.sigma0 * torch.randn(n, world.dim, generator=gen, dtype=torch.float64)
    return (1 - s) * x0 + s * torch.randn(n, world.dim, generator=gen, dtype=torch.float64)


@pytest.fixture(scope="module")
def small_world():
    return ShapesFlowModel(8).double()


@pytest.mark.parametrize("conditioned", [False, True])
@pytest.mark.parametrize("s", SIGMAS)
def test_velocity_is_the_exact_one_from_the_log_density(small_world, s, conditioned):
    world = small_world
    if conditioned:  # the oracle's world: the same prototypes reweighted
        world = world.conditioned(torch.randn(len(world.prototypes), generator=torch.Generator().manual_seed(1)))
        assert isinstance(world, ShapesFlowModel) and not torch.equal(world.log_weights, small_world.log_weights)
    x_s = near_the_mixture(world, s).requires_grad_(True)
    (score,) = torch.autograd.grad(independent_log_density(world, x_s, s).sum(), x_s)
    expected = (-s * score - x_s.detach()) / (1 - s)
    torch.testing.assert_close(world.velocity(x_s.detach(), 0, s), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_world_is_the_vp_world_at_the_same_abar(shift):
    """Same mixture => same VP marginal: the flow world's eps (from its velocity) equals the VP
    shapes world's eps (from its score) on the flow schedule, and its log density is the flow
    density rescaled by k^-D."""
    flow = ShapesFlowModel(8, shift=shift).double()
    vp = ShapesModel(8).double()
    vp.alphas_cumprod = flow.alphas_cumprod.clone()
    for t in (5, 300, 700, 995):
        s, abar = flow.sigma(t), float(flow.alphas_cumprod[t])
        k = vp_scale(s)
        x_vp = k * near_the_mixture(flow, s, seed=t)
        torch.testing.assert_close(flow.eps(x_vp, t), vp.eps(x_vp, t), rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(flow.predict(x_vp, t).x0,
                                   (x_vp - math.sqrt(1 - abar) * vp.eps(x_vp, t)) / math.sqrt(abar))
        torch.testing.assert_close(flow.log_density(x_vp, t),
                                   independent_log_density(flow, x_vp / k, s) - flow.dim * math.log(k))


# -- (c) the dependent combiner's product on the flow world ------------------------------------------
T, T_NEXT = 500, 480


@pytest.fixture(scope="module")
def flow_setup():
    world = ShapesFlowModel(8)
    conds = [Condition("red", AttributeEnergy(world, "color", "red"), "fixed", 2.0),
             Condition("mask", MaskEnergy(world, "red circle center"), "fixed", 3.0)]
    s = world.sigma(T)
    x_vp = vp_scale(s) * near_the_mixture(world, s, n=1, seed=4).float()
    z = torch.randn(1, world.dim, generator=torch.Generator().manual_seed(5))
    return world, conds, x_vp.view(1, *world.sample_shape), z.view(1, *world.sample_shape)


def flow_guidance(world, cond, t, rho):
    """x_s -> G_flow = -rho grad_{x_s} E(x_s - s v(x_s)): the guidance term in flow coordinates, written
    from the velocity alone, twice differentiable."""
    s = world.sigma(t)

    def G(x_s):
        with torch.enable_grad():
            x_s = x_s if x_s.requires_grad else x_s.clone().requires_grad_(True)
            image = (x_s - s * world.velocity(x_s[None], t, s)[0]).view(1, *world.sample_shape)
            (grad,) = torch.autograd.grad(cond.energy(image)[0], x_s, create_graph=True)
        return -rho * grad
    return G


def combined(world, solver, conds, x, z):
    sched = Schedule(world.alphas_cumprod, 50)
    step = GuidanceStep(world, solver, conds, x, T, T_NEXT, sched.abar(T), sched.abar(T_NEXT), z)
    return step, DependentCombiner(**EXACT).combine(step).guidance.flatten()


def test_dependent_on_the_flow_world_is_the_euler_maps_jacobian(flow_setup):
    """DDIM(eta=0) on the flow world: G_{2|1} = J_D^T g_tilde_vp = (1 / k) J_F^T g_tilde_flow, with F the
    guided flow Euler map x_s -> x_s + (s' - s)(v - s / (1 - s) G1_flow) built here from the velocity."""
    world, conds, x, z = flow_setup
    step, G = combined(world, DDIMSolver(eta=0.0), conds, x, z)
    s, s_next = world.sigma(T), world.sigma(T_NEXT)
    k, k_next = vp_scale(s), vp_scale(s_next)
    rho1 = conds[0].scale * math.sqrt(step.abar_t) * step.gain  # the fixed rule, with the solver's gain
    rho2 = conds[1].scale * math.sqrt(step.abar_next) * step.gain
    G1 = flow_guidance(world, conds[0], T, rho1)

    def F(x_s):
        v_g = world.velocity(x_s[None], T, s)[0] - s / (1 - s) * G1(x_s)
        return euler_step(x_s, v_g, s, s_next)

    x_s = x.flatten() / k
    x_hat = F(x_s).detach()
    torch.testing.assert_close(x_hat * k_next, step.phi(x, step.base().score + step.base().grads[0]).detach().flatten(),
                               rtol=1e-4, atol=1e-5)
    g_tilde_flow = flow_guidance(world, conds[1], T_NEXT, rho2)(x_hat).detach()
    expected = G1(x_s).detach() / k + jacobian(F, x_s).T @ g_tilde_flow / k
    assert (jacobian(F, x_s).T @ g_tilde_flow).norm() > 1e-2 * G1(x_s).norm()  # the product matters here
    torch.testing.assert_close(G, expected, rtol=1e-3, atol=1e-4 * float(expected.norm()))


def test_dependent_ddpm_on_the_flow_world_is_the_steps_jacobian(flow_setup):
    """The ancestral step on the flow world, written in VP coordinates from the velocity: the same check."""
    world, conds, x, z = flow_setup
    step, G = combined(world, DDPMSolver(), conds, x, z)
    s, k = world.sigma(T), vp_scale(world.sigma(T))
    a_t, a_n = step.abar_t, step.abar_next
    beta = 1 - a_t / a_n
    rho1, rho2 = conds[0].scale * math.sqrt(a_t), conds[1].scale * math.sqrt(a_n)
    G1 = flow_guidance(world, conds[0], T, rho1)

    def phi(x_vp):
        x_s = x_vp / k
        score_vp = -(x_s + (1 - s) * world.velocity(x_s[None], T, s)[0]) / math.sqrt(1 - a_t)
        return (2 - math.sqrt(1 - beta)) * x_vp + beta * (score_vp + G1(x_s) / k) + math.sqrt(beta) * z.flatten()

    x_hat = phi(x.flatten()).detach()
    k_next = vp_scale(world.sigma(T_NEXT))
    g_tilde = flow_guidance(world, conds[1], T_NEXT, rho2)(x_hat / k_next).detach() / k_next
    expected = G1(x.flatten() / k).detach() / k + jacobian(phi, x.flatten()).T @ g_tilde
    torch.testing.assert_close(G, expected, rtol=1e-3, atol=1e-4 * float(expected.norm()))


# -- (d) end to end through recipes, and the oracle ---------------------------------------------------
def recipe(combiner, solver, steps=20, samples=4):
    # the scales are ddpm's; ddim's default pull ('matched') is calibrated to give the same samples
    return {"model": {"kind": "shapes-flow", "size": 8}, "solver": {"kind": solver, "steps": steps},
            "combiner": {"kind": combiner},
            "conditions": [{"kind": "shapes-attribute", "name": "red", "attribute": "color", "value": "red",
                            "scale": 0.25},
                           {"kind": "shapes-mask", "name": "mask", "reference": "red circle center", "scale": 0.25}],
            "num_samples": samples, "batch_size": samples, "device": "cpu"}


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "pc"])
@pytest.mark.parametrize("combiner", ["sum", "dependent", "cagrad"])
def test_every_combiner_and_solver_runs_on_the_flow_world(combiner, solver):
    pipeline = build_pipeline(load_recipe(recipe(combiner, solver)))
    assert isinstance(pipeline.model, ShapesFlowModel)
    run = pipeline.run(list(range(4)), batch_size=4, progress=False)
    assert not run.errors and torch.isfinite(run.samples).all()
    energies = [c.energy for c in pipeline.conditions]
    summary = evaluate_samples(pipeline.model, run.samples, energies, [c.name for c in pipeline.conditions])["summary"]
    assert summary["on_manifold"] == 1.0 and summary["finite"] == 4
    assert summary["satisfaction"]["red"] >= 0.75  # guided: the unguided world makes a quarter red


def test_example_recipe_runs_and_is_evaluated(tmp_path):
    from zmagic_core.app.runner import generate

    plan = load_recipe(EXAMPLES / "flow-red-circle.yaml", ["model.size=8", "solver.steps=20", "num_samples=2",
                                                            "batch_size=2"])
    assert ShapesEvaluator().applies_to(plan.model_dump(mode="json"))
    record = generate(plan, tmp_path / "run", progress=False)
    assert record["evaluation"]["shapes"]["summary"]["finite"] == 2


def test_bad_shift_is_one_clear_error():
    data = recipe("sum", "ddpm")
    data["model"]["shift"] = 0
    with pytest.raises(ConfigError, match="shift"):
        load_recipe(data)


def oracle_histogram(world, energies, n, steps=25):
    joint = world.conditioned(target_log_weights(world, energies))
    watched = [Condition(f"c{i}", e, start=-1) for i, e in enumerate(energies)]  # never guiding
    run = Pipeline(joint, DDPMSolver(), SumCombiner(), watched, steps).run(list(range(n)), batch_size=n, progress=False)
    nearest, rms = nearest_prototypes(world, run.samples)
    assert (rms < 2 * world.sigma0).all()  # every oracle sample on the manifold
    return nearest


def exact_sampler_tv_quantile(world, energies, n, q=0.999, draws=2000):
    """The q-quantile of the TV of n exact samples' histogram to p(k | c), by simulated multinomial draws."""
    p = target_distribution(world, energies)
    picks = torch.multinomial(p, n * draws, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = torch.nn.functional.one_hot(picks.view(draws, n), len(p)).sum(1).double()
    return float((0.5 * (counts / n - p).abs().sum(1)).quantile(q))


def test_oracle_on_the_flow_world_matches_the_vp_world():
    """The exact conditional model on both worlds: each lands on the exact p(k | c) within sampling
    error (below the 0.999 quantile of an exact sampler's TV), so both on the same distribution."""
    flow, vp, n = ShapesFlowModel(8), ShapesModel(8), 256
    energies = [AttributeEnergy(flow, "color", "red"), MaskEnergy(flow, "red circle center")]
    bound = exact_sampler_tv_quantile(flow, energies, n)
    tvs = {name: tv_distance(w, oracle_histogram(w, energies, n), energies) for name, w in (("flow", flow), ("vp", vp))}
    assert tvs["flow"] < bound and tvs["vp"] < bound, (tvs, bound)
    wrong = tv_distance(flow, oracle_histogram(flow, energies[:1], n), energies)  # the colour alone
    assert wrong > bound, (wrong, bound)  # the check tells a near miss from the target
