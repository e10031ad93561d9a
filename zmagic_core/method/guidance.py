"""Guidance terms g_i(x_t) = -rho_i(t) grad_{x_t} E_i(decode(x0|t(x_t))) (METHOD.md section 2).

One network pass at a point serves every condition: :func:`evaluate` computes eps, the score,
the Tweedie clean estimate and the decoded image once, then each condition's energy and its
gradient with respect to x_t.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from zmagic_core.method.predictions import score_from_eps

STEP_RULES = ("fixed", "constant", "adaptive")

_DOUBLE_BACKWARD: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar(
    "zmagic_double_backward", default=None)


@contextlib.contextmanager
def double_backward_pass(enabled: bool = True):
    """Declare whether network passes inside this block may be differentiated twice.

    Models read it (:func:`double_backward_expected`) to pick attention kernels that support a
    second derivative only when one will be taken."""
    token = _DOUBLE_BACKWARD.set(bool(enabled))
    try:
        yield
    finally:
        _DOUBLE_BACKWARD.reset(token)


def double_backward_expected() -> Optional[bool]:
    """True/False inside :func:`double_backward_pass` (every guidance pass is one), else None."""
    return _DOUBLE_BACKWARD.get()


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
    extras: dict = field(default_factory=dict)  # the model's Prediction.extras at this point
    energies: list[torch.Tensor] = field(default_factory=list)
    grads: list[Optional[torch.Tensor]] = field(default_factory=list)


def evaluate(model, x: torch.Tensor, t: int, abar: float, conditions: list[Condition],
             guided: list[bool], create_graph: Union[bool, Sequence[bool]] = False) -> Evaluation:
    """One network pass at (x, t); g_i for every condition flagged in ``guided``, energies for all.

    ``create_graph`` (one flag, or one per condition) keeps those g_i differentiable in x, for
    the Hessian term; only the conditions that need it pay for a second derivative.
    """
    single = isinstance(create_graph, bool)
    graphs = [create_graph] * len(conditions) if single else list(create_graph)
    x = x.detach().requires_grad_(True)
    # An unguided pass (every condition outside its window) builds no autograd graph.
    with torch.set_grad_enabled(any(guided)), double_backward_pass(create_graph if single else any(graphs)):
        prediction = model.predict(x, max(t, 0))
        eps = prediction.eps.float()
        image = model.decode(prediction.x0).float()
        ev = Evaluation(x, t, abar, eps, score_from_eps(eps, abar), prediction.x0, image, prediction.extras)
        for cond, wanted, graph in zip(conditions, guided, graphs):
            if wanted:
                energy, g = cond.guidance(ev, graph)
            else:
                energy, g = cond.energy_only(ev), None
            ev.energies.append(energy)
            ev.grads.append(g)
    return ev


@dataclass
class GuidanceStep:
    """What a combiner sees for one solver step: the point, the levels, the solver map and z.

    ``conditions`` are the active ones, in recipe order.  :meth:`base` evaluates them at x_t
    (cached; asking for a graph the cached evaluation lacks recomputes it).
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
    _base_graphs: tuple = ()

    def base(self, create_graph: Union[bool, Sequence[bool]] = False) -> Evaluation:
        """Every active condition's g_i at x_t; ``create_graph``: one flag or one per condition."""
        n = len(self.conditions)
        wanted = tuple([create_graph] * n if isinstance(create_graph, bool) else create_graph)
        have = self._base_graphs or (False,) * n
        if self._base is None or any(w and not h for w, h in zip(wanted, have)):
            self._base = evaluate(self.model, self.x, self.t, self.abar_t, self.conditions,
                                  [True] * n, create_graph=list(wanted))
            self._base_graphs = wanted
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
