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


def evaluate_samples(world: ShapesModel, x0: torch.Tensor, energies, names: list[str]) -> dict:
    """Per-sample and summary figures for generated clean images x0 (N, 3, S, S)."""
    x0 = x0.detach().to(world.mu).flatten(1)
    loglik = condition_log_likelihoods(world, energies)  # (n, K)
    satisfies = loglik >= math.log(SATISFIED_RATIO)  # (n, K)
    joint_ok = satisfies.all(0)  # (K,)
    dist = torch.cdist(x0, world.mu)  # (N, K)
    nearest = dist.argmin(1)
    rms_dist = dist.gather(1, nearest[:, None]).squeeze(1) / math.sqrt(world.dim)
    with torch.no_grad():
        final_energy = torch.stack([e(x0.view(-1, *world.sample_shape)) for e in energies]) if energies else None

    samples = []
    for s, k in enumerate(nearest.tolist()):
        samples.append({
            "prototype": world.prototypes[k].attributes(),
            "distance_rms": float(rms_dist[s]),
            "on_manifold": bool(rms_dist[s] < ON_MANIFOLD_FACTOR * world.sigma0),
            "satisfied": {n: bool(satisfies[i, k]) for i, n in enumerate(names)},
            "joint": bool(joint_ok[k]),
            "energy": {n: float(final_energy[i, s]) for i, n in enumerate(names)},
        })

    n_samples = len(samples)
    target = torch.softmax(target_log_weights(world, energies), 0)
    hits = nearest[joint_ok[nearest]]
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
    }
    return {"summary": summary, "samples": samples}


class ShapesEvaluator(Evaluator):
    """Exact figures for runs on the shapes world: joint satisfaction, on-manifold rate, coverage and
    TV distance to the exact conditional, judged by p(c | k) rather than by the guiding energies."""

    def applies_to(self, recipe: dict) -> bool:
        return (recipe.get("model") or {}).get("kind") == "shapes"

    def evaluate(self, run: FinishedRun) -> dict:
        judged = [c for c in run.conditions if hasattr(c.energy, "log_likelihood")]  # shapes energies only
        return evaluate_samples(run.model, run.samples, [c.energy for c in judged], [c.name for c in judged])
