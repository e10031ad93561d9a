"""Guidance terms g_i(x_t) = -rho_i(t) grad_{x_t} E_i(decode(x0|t(x_t))) (METHOD.md section 2).

One network pass at a point serves every condition: :func:`evaluate` computes eps, the score,
the Tweedie clean estimate and the decoded image once, then each condition's energy and its
gradient with respect to x_t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

STEP_RULES = ("fixed", "constant", "adaptive")


def rms(v: torch.Tensor) -> torch.Tensor:
    """Root mean square per sample: sqrt(mean(v^2)) over all but the batch dimension."""
    return v.detach().flatten(1).pow(2).mean(dim=1).sqrt()


def step_size(rule: str, scale: float, abar_t: float, eps: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """rho_i(t) per sample, treated as a constant (no gradient flows through it).

    fixed: scale * sqrt(abar_t) (FreeDoM's face rule); constant: scale;
    adaptive: scale * rms(eps) / rms(grad E), which keeps the guidance on the score's scale.
    """
    batch = eps.shape[0]
    if rule == "fixed":
        return torch.full((batch,), scale * math.sqrt(abar_t), device=eps.device)
    if rule == "constant":
        return torch.full((batch,), float(scale), device=eps.device)
    if rule == "adaptive":
        return scale * rms(eps) / rms(grad).clamp_min(1e-12)
    raise ValueError(f"unknown step-size rule {rule!r}; expected one of {STEP_RULES}")


@dataclass
class Condition:
    """One condition of a run: an energy with its step-size rule, active window and time travel.

    Active for timesteps ``stop <= t <= start`` (FreeDoM's "stop": no guidance below it).
    """

    name: str
    energy: Optional[torch.nn.Module]
    rule: str = "adaptive"
    scale: float = 1.0
    start: int = 1_000_000
    stop: int = 0
    time_travel: int = 0

    def active(self, t: int) -> bool:
        return self.stop <= t <= self.start

    def guidance(self, ev: "Evaluation", create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy per sample, g_i) at the evaluation point; g_i keeps its graph if asked."""
        energy = self.energy(ev.image)
        (grad,) = torch.autograd.grad(energy.sum(), ev.x, retain_graph=True, create_graph=create_graph)
        rho = step_size(self.rule, self.scale, ev.abar, ev.eps, grad)
        return energy.detach(), -rho.view(-1, *([1] * (grad.ndim - 1))) * grad

    def energy_only(self, ev: "Evaluation") -> torch.Tensor:
        with torch.no_grad():
            return self.energy(ev.image.detach())


@dataclass
class Evaluation:
    """Everything computed at one point x (a leaf that requires grad) and one level t."""

    x: torch.Tensor
    t: int
    abar: float
    eps: torch.Tensor
    score: torch.Tensor
    x0: torch.Tensor
    image: torch.Tensor
    energies: list[torch.Tensor] = field(default_factory=list)
    grads: list[Optional[torch.Tensor]] = field(default_factory=list)


def evaluate(model, x: torch.Tensor, t: int, abar: float, conditions: list[Condition],
             guided: list[bool], create_graph: bool = False) -> Evaluation:
    """One network pass at (x, t); g_i for every condition flagged in ``guided``, energies for all.

    With ``create_graph`` the g_i stay differentiable in x (needed for the Hessian term).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        eps = model.eps(x, max(t, 0)).float()
        score = -eps / math.sqrt(1.0 - abar) if abar < 1.0 else torch.zeros_like(eps)
        x0 = (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
        image = model.decode(x0).float()
        ev = Evaluation(x, t, abar, eps, score, x0, image)
        for cond, wanted in zip(conditions, guided):
            if wanted:
                energy, g = cond.guidance(ev, create_graph)
            else:
                energy, g = cond.energy_only(ev), None
            ev.energies.append(energy)
            ev.grads.append(g)
    return ev


@dataclass
class GuidanceStep:
    """What a combiner sees for one solver step: the point, the levels, the solver map and z.

    ``conditions`` are the active ones, in recipe order.  :meth:`base` evaluates them at x_t
    (cached; asking again with ``create_graph`` recomputes with the graph kept).
    """

    model: object
    solver: object
    conditions: list[Condition]
    x: torch.Tensor
    t: int
    t_next: int
    abar_t: float
    abar_next: float
    z: torch.Tensor
    _base: Optional[Evaluation] = None
    _base_graph: bool = False

    def base(self, create_graph: bool = False) -> Evaluation:
        if self._base is None or (create_graph and not self._base_graph):
            self._base = evaluate(self.model, self.x, self.t, self.abar_t, self.conditions,
                                  [True] * len(self.conditions), create_graph=create_graph)
            self._base_graph = create_graph
        return self._base

    def phi(self, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The solver map at this step, with this step's noise z."""
        return self.solver.step(x, score, self.z, self.abar_t, self.abar_next)

    def evaluate(self, x: torch.Tensor, level: str, indices: list[int]) -> Evaluation:
        """Guidance of the conditions ``indices`` at a new point x, at level t or t'."""
        t, abar = (self.t, self.abar_t) if level == "t" else (self.t_next, self.abar_next)
        if t < 0:  # the final step reaches abar = 1; the last visited level stands in for it
            t, abar = self.t, self.abar_t
        conds = [self.conditions[i] for i in indices]
        return evaluate(self.model, x, t, abar, conds, [True] * len(conds))
