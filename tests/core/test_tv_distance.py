"""The headline quality figure: TV distance between the samples' prototype histogram and p(k | c)."""
import math

import pytest
import torch

from zmagic_core.app.bench import quality
from zmagic_core.models.shapes import AttributeEnergy, MaskEnergy, ShapesModel, evaluate_samples
from zmagic_core.models.shapes.evaluate import (ON_MANIFOLD_FACTOR, expected_tv_of_exact_sampler, landed_prototypes,
                                                nearest_prototypes, target_distribution, tv_distance)


@pytest.fixture(scope="module")
def world():
    return ShapesModel(32)


@pytest.fixture(scope="module")
def energies(world):
    return [AttributeEnergy(world, "color", "red"), MaskEnergy(world, "red circle center")]


def test_target_is_the_softmax_of_the_target_log_weights(world, energies):
    from zmagic_core.models.shapes import target_log_weights

    p = target_distribution(world, energies)
    torch.testing.assert_close(p, torch.softmax(target_log_weights(world, energies).double(), 0))
    assert p.sum().item() == pytest.approx(1.0) and len(p) == len(world.prototypes)


def test_tv_of_a_histogram_by_hand(world, energies):
    p = target_distribution(world, energies)
    k = int(p.argmax())
    at_k = world.mu[[k] * 10].view(10, *world.sample_shape)
    nearest, _ = nearest_prototypes(world, at_k)
    assert (nearest == k).all()
    assert tv_distance(world, nearest, energies) == pytest.approx(1.0 - float(p[k]))  # 0.5 (|1 - p_k| + sum of the rest)
    # a sample that is not finite lands on no prototype: its mass is lost (adds 1/(2N))
    broken = at_k.clone()
    broken[0, 0, 0, 0] = float("nan")
    nearest, rms = nearest_prototypes(world, broken)
    assert nearest[0] == -1 and math.isinf(rms[0]) and (nearest[1:] == k).all()
    expected = 0.5 * (abs(0.9 - float(p[k])) + (1 - float(p[k])) + 0.1)
    assert tv_distance(world, nearest, energies) == pytest.approx(expected)
    summary = evaluate_samples(world, broken, energies, ["red", "mask"])["summary"]
    assert summary["tv_distance"] == pytest.approx(expected) and summary["finite"] == 9
    assert summary["on_manifold"] == pytest.approx(0.9)


def test_a_sample_off_the_manifold_lands_on_no_prototype(world, energies):
    """The headline counts a sample only where it lands: one pushed 3 sigma0 (RMS) off its prototype is
    nobody's sample, so the right histogram off the manifold cannot score as if it were on it."""
    p = target_distribution(world, energies)
    k = int(p.argmax())
    at_k = world.mu[[k] * 4].view(4, *world.sample_shape).clone()
    direction = torch.randn(world.sample_shape, generator=torch.Generator().manual_seed(0))
    at_k[0] += 3 * world.sigma0 * direction / direction.pow(2).mean().sqrt()
    at_k[1] += 0.5 * ON_MANIFOLD_FACTOR * world.sigma0 * direction / direction.pow(2).mean().sqrt()
    nearest, _ = nearest_prototypes(world, at_k)
    assert (nearest == k).all()  # still nearest to k ...
    landed = landed_prototypes(world, at_k)
    assert landed.tolist() == [-1, k, k, k]  # ... but landed on it only within the manifold's radius
    expected = 0.5 * (abs(0.75 - float(p[k])) + (1 - float(p[k])) + 0.25)
    assert evaluate_samples(world, at_k, energies, ["red", "mask"])["summary"]["tv_distance"] == pytest.approx(expected)


def test_exact_samples_reach_the_noise_floor(world, energies):
    """Draws from p(k | c) land at the expected TV of an exact sampler (the floor the oracle shows)."""
    p = target_distribution(world, energies).float()
    n = 256
    tvs = []
    for seed in range(300):
        k = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(seed))
        tvs.append(tv_distance(world, k, energies))
    floor = expected_tv_of_exact_sampler(world, energies, n)
    assert 0 < floor < 0.2
    assert sum(tvs) / len(tvs) == pytest.approx(floor, rel=0.1)
    assert expected_tv_of_exact_sampler(world, energies, 4 * n) < floor  # more samples, lower floor


def test_the_benchmark_reports_the_evaluators_figure(world):
    scenario = quality.SCENARIOS[0]
    seeds = [0, 1, 2, 3]
    r = quality.run_method(world, scenario, "dep 1>2", seeds, 0.25, 5, 4)
    assert {"tv_all", "tv_floor", "fallbacks", "bounded_steps", "finite_samples"} <= set(r)
    oracle = quality.run_method(world, scenario, "oracle", seeds, 0.25, 5, 4)
    energies = [quality.build_energy(world, k, o) for _, k, o in scenario["conditions"]]
    assert oracle["tv_floor"] == pytest.approx(expected_tv_of_exact_sampler(world, energies, 4))
    assert 0.0 <= r["tv_all"] <= 1.0 and r["fallbacks"] == 0
