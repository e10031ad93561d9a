"""Ground-truth evaluation of shapes-world samples (SHAPES.md, "What it measures")."""
from __future__ import annotations

import math

import torch

from zmagic_core.contracts.components import Evaluator, FinishedRun
from zmagic_core.models.shapes.world import ShapesModel

ON_MANIFOLD_FACTOR = 2.0  # on the manifold: RMS distance to the nearest prototype below 2 sigma0
SATISFIED_RATIO = 0.5  # a prototype satisfies a condition when p(c|k) >= half the best p(c|k)


def condition_log_likelihoods(world: ShapesModel, energies) -> torch.Tensor:
    """(n, K): log p(c_i | k) for every condition and prototype."""
    if not energies:
        return torch.zeros(0, len(world.prototypes), device=world.mu.device)
    return torch.stack([e.log_likelihood(world).to(world.mu) for e in energies])


def target_log_weights(world: ShapesModel, energies) -> torch.Tensor:
    """log prod_i p(c_i | k): reweighting the prior by it gives the exact conditional model."""
    return condition_log_likelihoods(world, energies).sum(0)


def target_distribution(world: ShapesModel, energies) -> torch.Tensor:
    """The exact conditional p(k | c_1..c_n) over all prototypes: the prior reweighted by
    prod_i p(c_i | k) (softmax of the target log weights plus the prior's), float64."""
    return torch.softmax((world.log_weights + target_log_weights(world, energies)).double(), 0)


def nearest_prototypes(world: ShapesModel, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest prototype, RMS distance to it) per sample; a sample with a non-finite
    pixel lands on no prototype: index -1, distance inf."""
    x0 = x0.detach().to(world.mu).flatten(1)
    finite = torch.isfinite(x0).all(1)
    dist = torch.cdist(torch.where(finite[:, None], x0, torch.zeros_like(x0)), world.mu)  # (N, K)
    nearest = torch.where(finite, dist.argmin(1), torch.full_like(finite, -1, dtype=torch.long))
    rms = dist.gather(1, nearest.clamp_min(0)[:, None]).squeeze(1) / math.sqrt(world.dim)
    return nearest, torch.where(finite, rms, torch.full_like(rms, float("inf")))


def landed_prototypes(world: ShapesModel, x0: torch.Tensor) -> torch.Tensor:
    """The prototype each sample lands on: its nearest one when it is on the manifold (RMS distance
    below ON_MANIFOLD_FACTOR * sigma0), else -1 (a sample off the manifold is no prototype's sample)."""
    nearest, rms = nearest_prototypes(world, x0)
    return torch.where(rms < ON_MANIFOLD_FACTOR * world.sigma0, nearest, torch.full_like(nearest, -1))


def tv_distance(world: ShapesModel, nearest: torch.Tensor, energies) -> float:
    """Total variation between the histogram of the prototypes the samples land on
    (:func:`landed_prototypes`, all K prototypes) and the exact conditional p(k | c) over all K.

    0.5 * sum_k |n_k / N - p(k | c)|; a sample that lands on no prototype (off the manifold or
    non-finite) is mass in no bin, so it adds 1/(2N).  An exact sampler's N samples still give about
    0.5 * sum_k sqrt(2 p_k (1 - p_k) / (pi N)) (sampling noise): the oracle's own TV is the floor."""
    n = int(nearest.shape[0])
    if n == 0:
        return 1.0
    target = target_distribution(world, energies)
    landed = nearest[nearest >= 0]
    counts = torch.bincount(landed.cpu(), minlength=len(world.prototypes)).double()
    lost = (n - len(landed)) / n
    return 0.5 * (float((counts / n - target.cpu()).abs().sum()) + lost)


def expected_tv_of_exact_sampler(world: ShapesModel, energies, n: int) -> float:
    """E[TV] between the histogram of n exact samples and p(k | c) (the sampling-noise floor of
    :func:`tv_distance`): 0.5 * sum_k E|X_k / n - p_k| with X_k ~ Binomial(n, p_k), computed exactly."""
    if n <= 0:
        return 1.0
    p = target_distribution(world, energies).cpu().clamp(0.0, 1.0)
    x = torch.arange(n + 1, dtype=torch.float64)
    log_binom = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
    total = 0.0
    for pk in p.tolist():
        if pk <= 0.0 or pk >= 1.0:
            continue
        pmf = torch.exp(log_binom + x * math.log(pk) + (n - x) * math.log1p(-pk))
        total += float((pmf * (x / n - pk).abs()).sum())
    return 0.5 * total


def evaluate_samples(world: ShapesModel, x0: torch.Tensor, energies, names: list[str]) -> dict:
    """Per-sample and summary figures for generated clean images x0 (N, 3, S, S).

    The headline figure is ``tv_distance``: total variation between the samples' prototype
    histogram and the exact conditional over all prototypes (:func:`tv_distance`)."""
    x0 = x0.detach().to(world.mu).flatten(1)
    loglik = condition_log_likelihoods(world, energies)  # (n, K)
    satisfies = loglik >= math.log(SATISFIED_RATIO)  # (n, K)
    joint_ok = satisfies.all(0)  # (K,)
    nearest_all, rms_dist = nearest_prototypes(world, x0)
    nearest = nearest_all.clamp_min(0)  # a non-finite sample is reported at prototype 0, off the manifold
    with torch.no_grad():
        final_energy = torch.stack([e(x0.view(-1, *world.sample_shape)) for e in energies]) if energies else None

    samples = []
    for s, k in enumerate(nearest.tolist()):
        landed = bool(nearest_all[s] >= 0)  # a non-finite sample satisfies nothing
        samples.append({
            "prototype": world.prototypes[k].attributes() if landed else None,
            "distance_rms": float(rms_dist[s]),
            "on_manifold": bool(rms_dist[s] < ON_MANIFOLD_FACTOR * world.sigma0),
            "satisfied": {n: landed and bool(satisfies[i, k]) for i, n in enumerate(names)},
            "joint": landed and bool(joint_ok[k]),
            "energy": {n: float(final_energy[i, s]) for i, n in enumerate(names)},
        })

    n_samples = len(samples)
    target = torch.softmax(target_log_weights(world, energies), 0)
    hits = nearest_all[(nearest_all >= 0) & joint_ok[nearest]]
    counts = torch.bincount(hits, minlength=len(world.prototypes)).double()
    support = joint_ok.nonzero().squeeze(1)
    if len(hits):
        empirical = counts[support] / counts.sum()
        wanted = target.double()[support] / target.double()[support].sum()
        tv = 0.5 * float((empirical - wanted).abs().sum())
        coverage = float((counts[support] > 0).double().mean())
    else:
        tv, coverage = 1.0, 0.0
    summary = {
        "samples": n_samples,
        "joint_satisfaction": sum(s["joint"] for s in samples) / max(n_samples, 1),
        "satisfaction": {n: sum(s["satisfied"][n] for s in samples) / max(n_samples, 1) for n in names},
        "on_manifold": sum(s["on_manifold"] for s in samples) / max(n_samples, 1),
        "mean_energy": {n: float(final_energy[i].mean()) for i, n in enumerate(names)},
        "satisfying_prototypes": int(len(support)),
        "coverage": coverage,
        "tv_to_target": tv,
        # the headline: TV between all samples' prototype histogram and the exact p(k | c) over all K
        "tv_distance": tv_distance(world, landed_prototypes(world, x0), energies),
        "tv_floor": expected_tv_of_exact_sampler(world, energies, n_samples),  # an exact sampler's expected TV
        "finite": int((nearest_all >= 0).sum()),
    }
    return {"summary": summary, "samples": samples}


class ShapesEvaluator(Evaluator):
    """Exact figures for runs on the shapes world: joint satisfaction, on-manifold rate, coverage and
    TV distance to the exact conditional, judged by p(c | k) rather than by the guiding energies."""

    def applies_to(self, recipe: dict) -> bool:
        return (recipe.get("model") or {}).get("kind") in ("shapes", "shapes-flow")

    def evaluate(self, run: FinishedRun) -> dict:
        judged = [c for c in run.conditions if hasattr(c.energy, "log_likelihood")]  # shapes energies only
        result = evaluate_samples(run.model, run.samples, [c.energy for c in judged], [c.name for c in judged])
        # a plugin's condition has no exact p(c | k): the joint figures say nothing about it, and say so
        result["summary"]["not_judged"] = [c.name for c in run.conditions if c not in judged]
        return result
