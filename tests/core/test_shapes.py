"""The shapes world: exact score, posteriors, conditional sampling, energies' ground truth."""
import math

import pytest
import torch

from zmagic_core.method.combiners import SumCombiner
from zmagic_core.sampling.pipeline import Pipeline
from zmagic_core.models.shapes import ShapesModel, render
from zmagic_core.models.shapes.energies import AttributeEnergy, KeypointEnergy, MaskEnergy, StyleEnergy
from zmagic_core.models.shapes.evaluate import evaluate_samples, target_log_weights
from zmagic_core.method.solvers import DDIMSolver, DDPMSolver


@pytest.fixture(scope="module")
def world():
    return ShapesModel(size=16)


@pytest.mark.parametrize("t", [0, 200, 600, 999])
def test_score_is_gradient_of_exact_log_density(world, t):
    x = torch.randn(3, *world.sample_shape, dtype=torch.float64)
    w64 = world.double()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(w64.log_density(xg, t).sum(), xg)
    torch.testing.assert_close(w64.score(x, t), grad, rtol=1e-8, atol=1e-8)
    world.float()


def test_eps_and_posteriors(world):
    x = torch.randn(4, *world.sample_shape)
    r = world.responsibilities(x, 500)
    torch.testing.assert_close(r.sum(1), torch.ones(4))
    for attr, values in [("shape", ["circle", "square", "triangle"]), ("color", ["red", "green", "blue", "yellow"])]:
        total = sum((r * world.attribute_mask(attr, v)).sum(1) for v in values)
        torch.testing.assert_close(total, torch.ones(4))
    abar = world.alphas_cumprod[500].float()
    torch.testing.assert_close(world.eps(x, 500), -torch.sqrt(1 - abar) * world.score(x, 500))


def test_prototypes_are_distinct_and_in_range(world):
    assert len(world.prototypes) == 108
    assert world.mu.min() >= -1 and world.mu.max() <= 1
    d = torch.cdist(world.mu, world.mu) + torch.eye(108) * 1e3
    assert d.min() > 1.0
    img = render("circle", "red", "center", 32)
    assert img[0, 16, 16] == 1.0 and img[1, 16, 16] == -1.0 and img[:, 0, 0].abs().sum() == 0


@pytest.mark.parametrize("solver", [DDPMSolver(), DDIMSolver(eta=1.0)])
def test_exact_conditional_score_meets_attributes(world, solver):
    """Sampling with s + grad log p(c | x_t), exact, hits the requested attributes >= 95% of the time."""
    energies = [AttributeEnergy(world, "shape", "triangle"), AttributeEnergy(world, "color", "blue")]
    oracle = world.conditioned(target_log_weights(world, energies))
    result = Pipeline(oracle, solver, SumCombiner(), [], steps=100).run(list(range(64)), batch_size=64, progress=False)
    ev = evaluate_samples(world, result.samples, energies, ["triangle", "blue"])
    assert ev["summary"]["joint_satisfaction"] >= 0.95
    assert ev["summary"]["on_manifold"] >= 0.95
    assert ev["summary"]["coverage"] > 0.6  # spread over the 9 satisfying positions, not one mode


def test_unguided_samples_are_on_the_manifold_and_diverse(world):
    result = Pipeline(world, DDPMSolver(), SumCombiner(), [], steps=100).run(list(range(64)), batch_size=64, progress=False)
    ev = evaluate_samples(world, result.samples, [], [])
    assert ev["summary"]["on_manifold"] >= 0.95
    assert len({tuple(s["prototype"].values()) for s in ev["samples"]}) > 30


def test_energies_are_zero_at_their_reference_and_ground_truth_is_consistent(world):
    ref = render("circle", "green", "left", 16)[None]
    mask = MaskEnergy(world, "green circle left")
    key = KeypointEnergy(world, reference="green circle left")
    style = StyleEnergy(world, "green circle left")
    other = render("square", "red", "right", 16)[None]
    for e in (mask, key, style):
        assert float(e(ref)) < 1e-6
        assert float(e(other)) > 10 * float(e(ref)) + 1e-3
    sat = lambda e: {world.prototypes[k] for k in (e.log_likelihood(world) >= math.log(0.5)).nonzero().squeeze(1).tolist()}
    assert {(p.shape, p.position) for p in sat(mask)} == {("circle", "left")}
    assert {p.position for p in sat(key)} == {"left"}
    assert {p.color for p in sat(style)} == {"green"}
    attr = AttributeEnergy(world, "color", "green")
    assert {p.color for p in sat(attr)} == {"green"} and len(sat(attr)) == 27


def test_attribute_energy_prefers_matching_images(world):
    e = AttributeEnergy(world, "shape", "square")
    imgs = torch.stack([render("square", "red", "top", 16), render("circle", "red", "top", 16)])
    energy = e(imgs)
    assert energy[0] < energy[1]


def test_conditioned_model_reweights(world):
    lw = torch.full((108,), -1e4)
    lw[5] = 0.0
    only = world.conditioned(lw)
    x = torch.randn(2, *world.sample_shape)
    r = only.responsibilities(x, 900)
    assert torch.allclose(r[:, 5], torch.ones(2))
