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

from zmagic_core.contracts.errors import ConfigError
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

    def values(self, images: torch.Tensor) -> torch.Tensor:
        """The energy of each image, shape (B,): a plugin's energy that breaks this contract is named."""
        energy = self.energy(images)
        if not torch.is_tensor(energy) or energy.shape != images.shape[:1] or not energy.is_floating_point():
            got = f"a tensor of shape {tuple(energy.shape)}" if torch.is_tensor(energy) else type(energy).__name__
            raise ConfigError(f"condition {self.name!r}: its energy returned {got}; an energy returns one float "
                              f"per image, shape ({images.shape[0]},)")
        if images.requires_grad and not energy.requires_grad:
            raise ConfigError(f"condition {self.name!r}: its energy is not differentiable with respect to the image "
                              "(detached, or computed without autograd); guidance needs its gradient")
        return energy

    def guidance(self, ev: "Evaluation", create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy per sample, g_i) at the evaluation point; g_i keeps its graph if asked."""
        energy, g, _ = self.guidance_and_step(ev, create_graph)
        return energy, g

    def guidance_and_step(self, ev: "Evaluation", create_graph: bool, rho: Optional[torch.Tensor] = None,
                          retain_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(energy, g_i, rho_i): with ``rho`` given, that step size is used instead of this point's
        (the finite-difference product holds rho_1 constant, as the maths does)."""
        energy = self.values(ev.image)
        (grad,) = torch.autograd.grad(energy.sum(), ev.x, retain_graph=retain_graph or create_graph,
                                      create_graph=create_graph)
        if rho is None:
            rho = step_size(self.rule, self.scale, ev.abar, ev.eps, grad) * ev.gain
        return energy.detach(), -rho.view(-1, *([1] * (grad.ndim - 1))) * grad, rho.detach()

    def energy_only(self, ev: "Evaluation") -> torch.Tensor:
        with torch.no_grad():
            return self.values(ev.image.detach())


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
    gain: float = 1.0  # the solver's factor on step sizes (Solver.guidance_gain)
    energies: list[torch.Tensor] = field(default_factory=list)
    grads: list[Optional[torch.Tensor]] = field(default_factory=list)
    rhos: list[Optional[torch.Tensor]] = field(default_factory=list)  # rho_i per sample (None: the condition's own rule)

    def release(self) -> "Evaluation":
        """Detach everything from the network's autograd graph, so its memory can go (x stays the leaf)."""
        self.eps, self.score, self.x0, self.image = (v.detach() for v in (self.eps, self.score, self.x0, self.image))
        self.extras = {k: v.detach() if torch.is_tensor(v) else v for k, v in self.extras.items()}
        self.grads = [None if g is None else g.detach() for g in self.grads]
        return self


def _own_rule(cond: "Condition") -> bool:
    """True for conditions that compute g_i their own way (e.g. the prompt's CFG term): their
    guidance is called as is, with no step size to hold or report."""
    return type(cond).guidance is not Condition.guidance


def _guidance(cond: "Condition", ev: "Evaluation", create_graph: bool, rho=None, retain_graph: bool = True):
    if _own_rule(cond):
        energy, g = cond.guidance(ev, create_graph)
        return energy, g, None
    return cond.guidance_and_step(ev, create_graph, rho, retain_graph)


def evaluate(model, x: torch.Tensor, t: int, abar: float, conditions: list[Condition],
             guided: list[bool], create_graph: Union[bool, Sequence[bool]] = False,
             rhos: Optional[Sequence[Optional[torch.Tensor]]] = None, keep_graph: bool = True,
             gain: float = 1.0) -> Evaluation:
    """One network pass at (x, t); g_i for every condition flagged in ``guided``, energies for all.

    ``create_graph`` (one flag, or one per condition) keeps those g_i differentiable in x, for
    the Hessian term; only the conditions that need it pay for a second derivative.  ``rhos``
    (one per condition, None for its own rule) holds step sizes fixed.  ``keep_graph=False``
    releases the network's graph once the g_i are computed (eps, score, x0 and the image are
    then plain tensors): nothing can be differentiated through this point any more, and its
    activations do not stay in memory while the combiner evaluates other points.  ``gain``
    multiplies the step sizes the conditions' rules give (the solver's guidance gain).
    """
    single = isinstance(create_graph, bool)
    graphs = [create_graph] * len(conditions) if single else list(create_graph)
    rhos = list(rhos) if rhos is not None else [None] * len(conditions)
    x = x.detach().requires_grad_(True)
    last = max([k for k, w in enumerate(guided) if w], default=-1)
    # An unguided pass (every condition outside its window) builds no autograd graph.
    with torch.set_grad_enabled(any(guided)), double_backward_pass(create_graph if single else any(graphs)):
        prediction = model.predict(x, max(t, 0))
        eps = prediction.eps.float()
        image = model.decode(prediction.x0).float()
        ev = Evaluation(x, t, abar, eps, score_from_eps(eps, abar), prediction.x0, image, prediction.extras,
                        gain=gain)
        for k, (cond, wanted, graph) in enumerate(zip(conditions, guided, graphs)):
            if wanted:
                energy, g, rho = _guidance(cond, ev, graph, rhos[k], retain_graph=keep_graph or k < last)
            else:
                energy, g, rho = cond.energy_only(ev), None, None
            ev.energies.append(energy)
            ev.grads.append(g)
            ev.rhos.append(rho)
    return ev if keep_graph or any(graphs) else ev.release()


class StackLimit:
    """At most ``size`` points per stacked network call (None: all of them).

    A call that runs out of device memory is retried with half as many points per call, and the
    lowered size is kept for the calls after it (the next step would run out the same way);
    ``lowered`` lists every change as (points in the failed call, new size) so it can be reported."""

    def __init__(self, size: Optional[int] = None):
        self.size = size
        self.lowered: list[tuple[int, int]] = []

    def split(self, failed: int) -> None:
        self.size = (failed + 1) // 2
        self.lowered.append((failed, self.size))


def evaluate_points(model, points: Sequence[torch.Tensor], t: int, abar: float,
                    conditions: Sequence[Sequence[Condition]],
                    rhos: Optional[Sequence[Sequence[Optional[torch.Tensor]]]] = None,
                    stack: Union[None, int, StackLimit] = None, gain: float = 1.0) -> list[Evaluation]:
    """Several batches of points at one level in one network call (stacked along the batch).

    ``conditions[k]``: the conditions whose g is wanted at ``points[k]`` (in order; may be empty:
    eps and the score only), ``rhos[k]`` their held step sizes (None: the condition's rule at
    that point).  The k-th gradient of every point comes from one backward pass through the
    stacked batch.  Returns one released :class:`Evaluation` per point (no graph, no energies
    for the other conditions).  Every row is its own sample: stacking changes no sample's maths.
    ``stack``: at most that many points per network call (memory grows with the stack; None: all);
    a :class:`StackLimit` is lowered in place when a call of several points runs out of memory.
    """
    rhos = rhos if rhos is not None else [[None] * len(c) for c in conditions]
    limit = stack if isinstance(stack, StackLimit) else StackLimit(stack)
    if limit.size is not None and len(points) > limit.size:
        out: list[Evaluation] = []
        for a in range(0, len(points), limit.size):
            b = a + limit.size
            out += evaluate_points(model, points[a:b], t, abar, conditions[a:b], rhos[a:b], stack=limit, gain=gain)
        return out
    try:
        return _evaluate_stacked(model, points, t, abar, conditions, rhos, gain)
    except torch.OutOfMemoryError:
        if len(points) == 1:
            raise
    # retried outside the handler, so the failed call's traceback (and the tensors its frames hold) is gone
    limit.split(len(points))
    if points[0].device.type == "cuda":
        torch.cuda.empty_cache()
    return evaluate_points(model, points, t, abar, conditions, rhos, stack=limit, gain=gain)


def _evaluate_stacked(model, points, t, abar, conditions, rhos, gain) -> list[Evaluation]:
    """evaluate_points's single network call over all ``points``."""
    sizes = [p.shape[0] for p in points]
    x = torch.cat([p.detach() for p in points]).requires_grad_(True)
    rounds = max((len(c) for c in conditions), default=0)
    differentiated = any(not _own_rule(c) for cs in conditions for c in cs)  # else no backward: no graph needed
    with torch.set_grad_enabled(differentiated), double_backward_pass(False):
        prediction = model.predict(x, max(t, 0))
        eps = prediction.eps.float()
        image = model.decode(prediction.x0).float()
        score = score_from_eps(eps, abar)
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        rows = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        evs = [Evaluation(x[r], t, abar, eps[r], score[r], prediction.x0[r], image[r],
                          {k: v[r] if torch.is_tensor(v) else v for k, v in prediction.extras.items()}, gain=gain)
               for r in rows]
        for r in range(rounds):  # the r-th condition of every point: one backward through the stack
            jobs = [k for k, c in enumerate(conditions) if len(c) > r]
            plain = [k for k in jobs if not _own_rule(conditions[k][r])]
            if plain:
                energies = {k: conditions[k][r].values(image[rows[k]]) for k in plain}
                later = any(not _own_rule(c[q]) for c in conditions for q in range(r + 1, len(c)))
                (grad,) = torch.autograd.grad(sum(e.sum() for e in energies.values()), x, retain_graph=later)
            for k in jobs:
                cond, ev = conditions[k][r], evs[k]
                if k in plain:
                    g_e = grad[rows[k]]
                    rho = rhos[k][r] if rhos[k][r] is not None else step_size(cond.rule, cond.scale, abar, ev.eps, g_e) * gain
                    energy, g = energies[k].detach(), -rho.view(-1, *([1] * (g_e.ndim - 1))) * g_e
                else:
                    (energy, g), rho = cond.guidance(ev, False), None
                ev.energies.append(energy.detach())
                ev.grads.append(g.detach())
                ev.rhos.append(None if rho is None else rho.detach())
    for ev in evs:
        ev.x = ev.x.detach()
        ev.release()
    return evs


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
    _base_guided: tuple = ()
    _base_kept: bool = True

    def base(self, create_graph: Union[bool, Sequence[bool]] = False, guided: Optional[Sequence[bool]] = None,
             keep_graph: Optional[bool] = None) -> Evaluation:
        """The active conditions' g_i at x_t (cached; a request the cache cannot serve recomputes it).

        ``create_graph``: one flag or one per condition (g_i differentiable in x_t); ``guided``: which
        g_i to compute (default: all; the others get their energy only and a None gradient);
        ``keep_graph``: True keeps the network's graph (a VJP through the score follows), False
        releases it, None (default) accepts either when cached and keeps it when computing.
        """
        n = len(self.conditions)
        graphs = tuple(bool(g) for g in ([create_graph] * n if isinstance(create_graph, bool) else create_graph))
        have_graphs = self._base_graphs or (False,) * n
        have = self._base_guided or (False,) * n
        if guided is None:  # all of them, or whatever the cached evaluation has
            wanted = have if self._base is not None else (True,) * n
        else:
            wanted = tuple(bool(g) for g in guided)
        wanted = tuple(w or g for w, g in zip(wanted, graphs))
        stale = (self._base is None or any(w and not h for w, h in zip(graphs, have_graphs))
                 or any(w and not h for w, h in zip(wanted, have)) or (keep_graph and not self._base_kept))
        if stale:
            if self._base is not None:  # never lose what the cached evaluation had
                wanted = tuple(w or h for w, h in zip(wanted, have))
            keep = True if keep_graph is None else keep_graph
            self._base = evaluate(self.model, self.x, self.t, self.abar_t, self.conditions,
                                  list(wanted), create_graph=list(graphs), keep_graph=keep, gain=self.gain)
            self._base_graphs, self._base_guided, self._base_kept = graphs, wanted, keep or any(graphs)
        return self._base

    @property
    def gain(self) -> float:
        """The solver's factor on the energies' step sizes at this step (Solver.guidance_gain)."""
        gain = getattr(self.solver, "guidance_gain", None)  # duck-typed solvers may lack it
        return float(gain(self.abar_t, self.abar_next)) if gain is not None else 1.0

    def level(self, level: str) -> tuple[int, float]:
        """(t, abar) of level ``t`` or ``t_next`` (the final step's t' = -1 falls back to t)."""
        t, abar = (self.t, self.abar_t) if level == "t" else (self.t_next, self.abar_next)
        if t < 0:  # the final step reaches abar = 1; the last visited level stands in for it
            t, abar = self.t, self.abar_t
        return t, abar

    def phi(self, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The solver map at this step, with this step's noise z."""
        return self.solver.step(x, score, self.z, self.abar_t, self.abar_next)

    def evaluate(self, x: torch.Tensor, level: str, indices: list[int], keep_graph: bool = True) -> Evaluation:
        """Guidance of the conditions ``indices`` at a new point x, at level t or t'."""
        t, abar = self.level(level)
        conds = [self.conditions[i] for i in indices]
        return evaluate(self.model, x, t, abar, conds, [True] * len(conds), keep_graph=keep_graph, gain=self.gain)
