"""The default product of Algorithms 1 and 2 (a forward difference of the step map, no double backward)
against the exact vector-Jacobian product, and the bound on the Hessian term."""
import math

import pytest
import torch

from zmagic_core.method.combiners import (CAGradCombiner, DependentCombiner, conditional_gradients,
                                          step_noise_fraction)
from zmagic_core.method.guidance import Condition, GuidanceStep, double_backward_expected
from zmagic_core.method.schedule import Schedule
from zmagic_core.method.solvers import DDIMSolver, DDPMSolver
from zmagic_core.models.shapes import AttributeEnergy, MaskEnergy, ShapesModel
from zmagic_core.sampling.pipeline import Pipeline

EXACT = dict(product="autograd", bound="none", project="none")
FAST = dict(product="difference", bound="none", project="none")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)


def conditional_term(combiner, step_factory) -> torch.Tensor:
    """g_{2|1} = G - g1 of a dependent combiner (g1 from a fresh evaluation at the same point)."""
    G = combiner.combine(step_factory()).guidance
    return G - step_factory().base().grads[0]


@pytest.fixture
def mixture_step(tiny_model, tiny_energies):
    def make(solver, t=500, t_next=490, seed=0, rule="fixed", batch=3, conditions=None):
        gen = torch.Generator().manual_seed(seed)
        conds = conditions or [Condition("a", tiny_energies[0], rule, 2.0), Condition("b", tiny_energies[1], rule, 3.0)]
        x, z = torch.randn(batch, 6, generator=gen), torch.randn(batch, 6, generator=gen)
        sched = Schedule(tiny_model.alphas_cumprod, 100)
        return lambda: GuidanceStep(tiny_model, solver, conds, x, t, t_next, sched.abar(t), sched.abar(t_next), z)
    return make


@pytest.mark.parametrize("solver", [DDPMSolver(), DDIMSolver(0.0), DDIMSolver(0.7)], ids=["ddpm", "ddim", "ddim0.7"])
@pytest.mark.parametrize("t", [900, 500, 100, 10])
@pytest.mark.parametrize("hessian", [True, False])
def test_difference_product_matches_the_vjp_on_a_mixture(mixture_step, solver, t, hessian):
    """J_Phi is symmetric for a true score, so the directional derivative is J_Phi^T g_tilde."""
    step = mixture_step(solver, t=t, t_next=t - 10)
    exact = conditional_term(DependentCombiner(hessian=hessian, **EXACT), step)
    fast = conditional_term(DependentCombiner(hessian=hessian, **FAST), step)
    assert (relative_error(fast, exact) < 1e-2).all()


def shapes_step(world, t, solver, rule="fixed", scale=20.0, batch=6, seed=0):
    sched = Schedule(world.alphas_cumprod, 100)
    t_next = t - 10
    a, a_next = sched.abar(t), sched.abar(t_next)
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(0, len(world.prototypes), (batch,), generator=gen)
    x = (math.sqrt(a) * world.mu[k] + math.sqrt(1 - a) * torch.randn(batch, world.dim, generator=gen))
    x = x.view(batch, *world.sample_shape)
    z = torch.randn(x.shape, generator=gen)
    conds = [Condition("red", AttributeEnergy(world, "color", "red"), rule, scale),
             Condition("mask", MaskEnergy(world, "red circle center"), rule, scale)]
    return lambda: GuidanceStep(world, solver, conds, x, t, t_next, a, a_next, z)


@pytest.fixture(scope="module")
def world():
    return ShapesModel(32)


@pytest.mark.parametrize("t", [900, 700, 300, 100, 30])
@pytest.mark.parametrize("solver", [DDPMSolver(), DDIMSolver(0.0)], ids=["ddpm", "ddim"])
def test_difference_product_matches_the_vjp_on_the_shapes_world(world, t, solver):
    """Relative error of g_{2|1} = J_Phi^T g_tilde at most 1e-2 at these t (docs/method.md gives the
    error along real trajectories, and the band t ~ 400..600 where the mixture's posterior switches
    within the difference step and the forward difference is less accurate)."""
    step = shapes_step(world, t, solver)
    exact = conditional_term(DependentCombiner(**EXACT), step)
    fast = conditional_term(DependentCombiner(**FAST), step)
    assert (relative_error(fast, exact) < 1e-2).all(), relative_error(fast, exact)


def test_cagrad_difference_pairs_match_the_exact_pairs(mixture_step, tiny_energies):
    third = type(tiny_energies[0])([0.1, 0.2, -0.3, 0.0, 0.4, -0.1], 2.0)  # the conftest's QuadraticEnergy
    conds = [Condition("a", tiny_energies[0], "fixed", 2.0), Condition("b", tiny_energies[1], "fixed", 3.0),
             Condition("c", third, "fixed", 1.0)]
    step = mixture_step(DDPMSolver(), t=400, t_next=390, conditions=conds)
    pairs, exact = CAGradCombiner(c=0.5, **EXACT).pair_gradients(step())
    pairs_fast, fast = CAGradCombiner(c=0.5, **FAST).pair_gradients(step())
    assert pairs == pairs_fast and len(pairs) == 6
    for e, f in zip(exact, fast):
        assert (relative_error(f, e) < 1e-2).all()


def test_the_bound_acts_on_the_hessian_term_only(mixture_step):
    step = mixture_step(DDPMSolver(), t=300, t_next=290)
    s = step()
    ev = s.base(create_graph=[True, False], keep_graph=True)
    x_hat = s.phi(ev.x, ev.score + ev.grads[0]).detach()
    tilde_norm = s.evaluate(x_hat, "t_next", [1]).grads[0].flatten(1).norm(dim=1)
    for product in ("autograd", "difference"):
        free = conditional_term(DependentCombiner(product=product, bound="none", project="none"), step)
        loose = conditional_term(DependentCombiner(product=product, bound=1e6, project="none"), step)
        torch.testing.assert_close(loose, free, rtol=1e-5, atol=1e-6)  # a loose bound changes nothing
        plain = conditional_term(DependentCombiner(product=product, hessian=False, project="none"), step)
        h_norm = (free - plain).flatten(1).norm(dim=1)  # the Hessian term
        tight = conditional_term(DependentCombiner(product=product, bound=1e-6, project="none"), step)
        torch.testing.assert_close(tight, plain, rtol=1e-4, atol=1e-5)  # only the Hessian term is cut
        bound = 0.5 * float((h_norm / tilde_norm).max())  # binds for at least one sample
        info: dict = {}
        s = step()
        g21 = conditional_gradients(s, s.base(create_graph=[True, False], keep_graph=True), 0, [1], True, "t_next",
                                    product=product, bound=bound, info=info)[0]
        cut = (g21 - plain).flatten(1).norm(dim=1)
        assert (cut <= bound * tilde_norm * (1 + 1e-3) + 1e-7).all()
        assert (cut <= h_norm * (1 + 1e-3) + 1e-7).all()  # never longer than it was
        assert info["bounded"].sum() >= 1


def test_a_deterministic_step_trusts_no_hessian_term(mixture_step):
    """The trust region scales with the step's noise: 0 for DDIM(eta=0), which then drops the H term."""
    assert step_noise_fraction(mixture_step(DDPMSolver())()) == pytest.approx(1.0)
    assert step_noise_fraction(mixture_step(DDIMSolver(0.0))()) == 0.0
    assert 0.0 < step_noise_fraction(mixture_step(DDIMSolver(0.5))()) < 1.0
    step = mixture_step(DDIMSolver(0.0))
    bounded = conditional_term(DependentCombiner(), step)
    plain = conditional_term(DependentCombiner(hessian=False), step)
    torch.testing.assert_close(bounded, plain, rtol=1e-5, atol=1e-6)


class Counting(torch.nn.Module):
    """An energy that records, for each evaluation, whether a double backward was declared for it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, images):
        self.seen.append(double_backward_expected())
        return self.inner(images)


@pytest.mark.parametrize("kind,options", [(DependentCombiner, {}), (DependentCombiner, {"product": "autograd"}),
                                          (CAGradCombiner, {})], ids=["difference", "autograd", "cagrad"])
def test_an_empty_trust_region_skips_the_hessian_pass(mixture_step, tiny_energies, kind, options):
    """Under DDIM(eta=0) the bound cuts the H-term to nothing: its pass is not taken, the result is the one
    without the H-term, and every pair is reported as bounded."""
    def run(solver, hessian=True):
        first = Counting(tiny_energies[0])
        conds = [Condition("a", first, "fixed", 2.0), Condition("b", tiny_energies[1], "fixed", 3.0)]
        out = kind(hessian=hessian, **options).combine(mixture_step(solver, conditions=conds)())
        return out, first.seen

    cut, seen = run(DDIMSolver(0.0))
    plain, plain_seen = run(DDIMSolver(0.0), hessian=False)
    torch.testing.assert_close(cut.guidance, plain.guidance, rtol=1e-5, atol=1e-6)
    assert seen == plain_seen and True not in seen
    pairs = 2 if kind is CAGradCombiner else 1
    assert cut.info["bounded"].tolist() == [pairs] * 3
    _, noisy = run(DDIMSolver(0.7))  # a noisy step keeps the H-term and pays for it: one more evaluation
    assert len(noisy) > len(seen) or True in noisy  # (difference) or a double backward (autograd)


class Watching(ShapesModel):
    """Records, for every network pass, whether a double backward was declared for it."""

    def __init__(self):
        super().__init__(16)
        self.seen = []

    def eps(self, x, t):
        self.seen.append(double_backward_expected())
        return super().eps(x, t)


@pytest.mark.parametrize("combiner,double", [(DependentCombiner(), False), (CAGradCombiner(), False),
                                             (DependentCombiner(product="autograd"), True)])
def test_the_difference_product_declares_no_double_backward(combiner, double):
    """So models keep their fast attention kernels (create_graph is never set)."""
    model = Watching()
    conds = [Condition("red", AttributeEnergy(model, "color", "red"), "adaptive", 0.25),
             Condition("mask", MaskEnergy(model, "red circle center"), "adaptive", 0.25)]
    Pipeline(model, DDPMSolver(), combiner, conds, steps=3).run([0, 1], batch_size=2, progress=False)
    assert (True in model.seen) == double


def test_the_trace_cosine_is_computed_only_when_asked(world):
    conds = [Condition("red", AttributeEnergy(world, "color", "red"), "adaptive", 0.25),
             Condition("mask", MaskEnergy(world, "red circle center"), "adaptive", 0.25)]
    plain = Pipeline(world, DDPMSolver(), DependentCombiner(), conds, steps=3).run([0], progress=False)
    asked = Pipeline(world, DDPMSolver(), DependentCombiner(trace_cosine=True), conds, steps=3).run([0], progress=False)
    assert all("red~mask" not in rec["cosine"] and "mask" not in rec["grad_norm"] for rec in plain.trace[0])
    assert all("red~mask" in rec["cosine"] and "cos(g1,g2|1)" in rec for rec in asked.trace[0])
    assert all(set(rec["energy"]) == {"red", "mask"} for rec in plain.trace[0])  # energies are always there
    torch.testing.assert_close(plain.samples, asked.samples)  # the option changes nothing else


def test_bound_none_is_the_paper_and_is_accepted_as_a_string():
    assert DependentCombiner(bound="none").bound is None and DependentCombiner(bound=None).bound is None
    options = DependentCombiner.Options(bound="none")
    assert options.bound == "none"
    with pytest.raises(Exception):
        DependentCombiner.Options(bound=-1.0)
    with pytest.raises(ValueError):
        DependentCombiner(product="finite")


def test_cagrad_stack_limits_the_points_per_call_without_changing_g(world):
    conds = [Condition("red", AttributeEnergy(world, "color", "red"), "adaptive", 0.25),
             Condition("mask", MaskEnergy(world, "red circle center"), "adaptive", 0.25),
             Condition("mask2", MaskEnergy(world, "red square top"), "adaptive", 0.25)]
    runs = [Pipeline(world, DDPMSolver(), CAGradCombiner(stack=s), conds, steps=4).run([0, 1], batch_size=2, progress=False)
            for s in (None, 1, 4)]
    for r in runs[1:]:
        torch.testing.assert_close(r.samples, runs[0].samples, rtol=1e-5, atol=1e-5)


class RunsOutOfMemory:
    """The shapes world, except that a network call of more than ``rows`` rows raises an out-of-memory error."""

    def __init__(self, world, rows: int):
        self.world, self.rows, self.raised = world, rows, 0

    def predict(self, x, t):
        if x.shape[0] > self.rows:
            self.raised += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} rows")
        return self.world.predict(x, t)

    def __getattr__(self, name):
        return getattr(self.world, name)


def test_cagrad_splits_a_stacked_call_that_runs_out_of_memory_and_keeps_the_smaller_stack(world):
    """3 conditions, 2 samples: the x_hat call stacks 3 points (6 rows), the difference call 6 (12 rows). With
    at most 4 rows per call the first stacked call fails once, the stack drops to 2 points for the rest of the
    run, the samples are those of an unconstrained run, and the trace and the run's problems report it."""
    from zmagic_core.app.runner import guidance_problems

    conds = [Condition("red", AttributeEnergy(world, "color", "red"), "adaptive", 0.25),
             Condition("mask", MaskEnergy(world, "red circle center"), "adaptive", 0.25),
             Condition("mask2", MaskEnergy(world, "red square top"), "adaptive", 0.25)]
    free = Pipeline(world, DDPMSolver(), CAGradCombiner(), conds, steps=4).run([0, 1], batch_size=2, progress=False)
    small = RunsOutOfMemory(world, rows=4)
    combiner = CAGradCombiner()
    tight = Pipeline(small, DDPMSolver(), combiner, conds, steps=4).run([0, 1], batch_size=2, progress=False)
    assert not tight.errors and small.raised == 1
    assert combiner.stack_limit.size == 2 and combiner.stack_limit.lowered == [(3, 2)]
    torch.testing.assert_close(tight.samples, free.samples, rtol=1e-5, atol=1e-5)
    guided = [rec for rec in tight.trace[0] if rec.get("grad_norm")]
    assert guided and all(rec["stack"] == 2 for rec in guided)
    assert "stack" not in free.trace[0][0]
    assert guidance_problems(tight.trace)["stack_lowered_to"] == 2
    assert "stack_lowered_to" not in guidance_problems(free.trace)


def test_a_single_point_that_runs_out_of_memory_is_an_error_not_a_retry_loop(world):
    conds = [Condition("red", AttributeEnergy(world, "color", "red"), "adaptive", 0.25),
             Condition("mask", MaskEnergy(world, "red circle center"), "adaptive", 0.25)]
    small = RunsOutOfMemory(world, rows=0)
    result = Pipeline(small, DDPMSolver(), CAGradCombiner(), conds, steps=2).run([0], batch_size=1, progress=False)
    message = next(iter(result.errors.values()))
    assert message.startswith("OutOfMemoryError: CUDA out of memory") and "\n" not in message
    assert "batch_size 1" in message and "combiner's stack" in message  # what lowers it
    assert small.raised == 1
