"""Gradient combiners (METHOD.md section 4): sum, dependent (Algorithm 1), cagrad (Algorithm 2)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from zmagic_core.method.cagrad import cagrad_directions
from zmagic_core.contracts.components import Combined, Combiner
from zmagic_core.method.guidance import Evaluation, GuidanceStep, StackLimit, evaluate_points


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per sample between two batched tensors."""
    a, b = a.detach().flatten(1), b.detach().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


PRODUCTS = ("difference", "autograd")
DEFAULT_PRODUCT = "difference"
FD_STEP = 1e-3  # relative step of the forward difference: h ||v|| = FD_STEP ||x_t|| (docs/method.md)
DEFAULT_BOUND = 1.0  # trust region of the Hessian term: ||H-term|| <= DEFAULT_BOUND ||g_tilde|| (docs/method.md)
PROJECTIONS = ("none", "hessian", "conditional")
DEFAULT_PROJECT = "conditional"  # g_{j|i} without its component along the score (chosen by the defaults sweep, docs/method.md)
DEFAULT_RESCALE = "1/(1+c)"  # ||G|| <= ||mean pair gradient|| (chosen by the defaults sweep, docs/method.md); the paper: "none"


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1)


def _col(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(-1, *([1] * (ndim - 1)))


def _check_choices(product: str, project: str) -> None:
    if product not in PRODUCTS:
        raise ValueError(f"unknown product {product!r}; expected one of {PRODUCTS}")
    if project not in PROJECTIONS:
        raise ValueError(f"unknown projection {project!r}; expected one of {PROJECTIONS}")


def without_component(v: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """v minus its projection on ``direction``, per sample."""
    d, flat = direction.flatten(1), v.flatten(1)
    coef = (flat * d).sum(1, keepdim=True) / (d * d).sum(1, keepdim=True).clamp_min(1e-30)
    return (flat - coef * d).view_as(v)


def conditional_gradients(step: GuidanceStep, ev: Evaluation, first: int, seconds: list[int],
                          hessian: bool, level: str, cap: Optional[float] = None, *, product: str = "autograd",
                          bound: Optional[float] = None, fd_step: float = FD_STEP, project: str = "none",
                          info: Optional[dict] = None,
                          stack: Union[None, int, StackLimit] = None) -> list[torch.Tensor]:
    """g_{j|i} for one first condition i and several second conditions j (Algorithm 1, steps 2-4).

    x_hat = Phi_t(x_t, s(x_t) + g_i, z) is built once and shared by every j.  ``product``:
    ``autograd`` takes each g_{j|i} as the vector-Jacobian product of that map with
    stopgrad(g_tilde_j) (``ev`` must keep its graph, and g_i's with ``hessian``), so no Jacobian
    or Hessian is ever formed; ``difference`` uses that J_Phi is symmetric and takes the
    directional derivative of the step map along g_tilde_j by a forward difference (one more
    network pass, no double backward; ``ev`` may be released).  Without ``hessian`` g_i enters as
    a constant, dropping the H_i term.  ``bound``: the H_i term scaled down per sample to at most
    bound * nu * ||g_tilde_j||, nu = the step's noise relative to the ancestral step's
    (:func:`step_noise_fraction`; None: the paper's update).  ``cap``: the whole g_{j|i} scaled down per
    sample to at most cap * ||g_tilde_j||.  ``project``: remove the component along the score s(x_t)
    from the H_i term (``hessian``) or from the whole g_{j|i} (``conditional``); ``none``: the paper's.
    ``info`` (a dict) receives per-sample diagnostics.
    """
    (out,) = pair_conditional_gradients(step, ev, [(first, seconds)], hessian, level, cap, product=product,
                                        bound=bound, fd_step=fd_step, project=project, info=info, stack=stack)
    return out


def pair_conditional_gradients(step: GuidanceStep, ev: Evaluation, plan: list[tuple[int, list[int]]],
                               hessian: bool, level: str, cap: Optional[float] = None, *,
                               product: str = "autograd", bound: Optional[float] = None,
                               fd_step: float = FD_STEP, project: str = "none", info: Optional[dict] = None,
                               stack: Union[None, int, StackLimit] = None) -> list[list[torch.Tensor]]:
    """:func:`conditional_gradients` for several first conditions: ``plan`` = [(i, [j, ...]), ...].

    With ``difference`` the work is batched across first conditions: every x_hat_i goes through
    one stacked network call (the g_tilde_j at each, one backward per round of second conditions),
    and every pair's difference point through another (``stack``: at most that many points per call).
    """
    _check_choices(product, project)
    trust = None if bound is None else bound * step_noise_fraction(step)
    cut = hessian and not hessian_term_wanted(step, hessian, bound)  # an empty trust region: its pass is skipped
    hessian = hessian and not cut
    if product == "autograd":
        split = bound is not None or project == "hessian"
        parts = [_autograd_products(step, ev, i, js, hessian, level, split=split) for i, js in plan]
    else:
        parts = _difference_products(step, ev, plan, hessian, level, fd_step, stack)
    bounded = torch.full((ev.x.shape[0],), float(sum(len(js) for _, js in plan)) if cut else 0.0, device=ev.x.device)
    score = ev.score.detach()  # the noise direction: moving x_t along it changes its noise level, not its content
    out = []
    for terms in parts:
        row = []
        for tilde, plain, h_term in terms:
            if h_term is not None and project == "hessian":
                h_term = without_component(h_term, score)
            if h_term is not None and trust is not None:
                limit = trust * _per_sample(tilde)
                bounded += (_per_sample(h_term) > limit).float()
                h_term = _capped(h_term, limit)
            g = plain if h_term is None else plain + h_term
            if project == "conditional":
                g = without_component(g, score)
            if cap is not None:
                g = _capped(g, cap * _per_sample(tilde))
            row.append(g)
        out.append(row)
    if info is not None and bound is not None:
        info["bounded"] = bounded  # per sample: how many pairs had their Hessian term cut by the bound
    return out


def hessian_term_wanted(step: GuidanceStep, hessian: bool, bound: Optional[float]) -> bool:
    """Whether the H-term is computed at this step: asked for, and not cut to nothing by an empty trust
    region (bound * nu = 0 on a deterministic step, where its passes would be wasted)."""
    return hessian and (bound is None or bound * step_noise_fraction(step) > 0.0)


def step_noise_fraction(step: GuidanceStep) -> float:
    """sigma_step / sqrt(beta_eff): the noise the step injects, relative to the ancestral step's (1 for
    DDPM and the PC predictor, 0 for deterministic DDIM, in between for DDIM(eta)).  Read off the solver
    map itself: Phi(0, 0, 1) - Phi(0, 0, 0)."""
    one = torch.ones(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    sigma = float(step.solver.step(zero, zero, one, step.abar_t, step.abar_next)
                  - step.solver.step(zero, zero, zero, step.abar_t, step.abar_next))
    beta = 1.0 - step.abar_t / step.abar_next
    return min(max(sigma, 0.0) / beta**0.5, 1.0) if beta > 0 else 0.0


def _autograd_products(step, ev, first, seconds, hessian, level, split):
    """[(g_tilde_j, term, H-term or None)] by vector-Jacobian products through the step map.

    Unsplit (no bound), one VJP gives the whole J_Phi^T g_tilde (``term``; H-term None).  Split,
    ``term`` is the product with g_i held constant and the H-term the VJP of g_i with
    (dPhi/dscore)^T g_tilde (a double backward), so that the bound can act on it alone."""
    g_first = ev.grads[first] if hessian else ev.grads[first].detach()
    x_hat = step.phi(ev.x, ev.score + g_first)
    tilde = step.evaluate(x_hat.detach(), level, seconds, keep_graph=False)
    tildes = [g.detach() for g in tilde.grads]
    if not split or not hessian:
        return [(v, p, None) for v, p in zip(tildes, vector_jacobian_products(x_hat, ev.x, tildes))]
    plain = vector_jacobian_products(step.phi(ev.x, ev.score + g_first.detach()), ev.x, tildes)
    score = (ev.score + g_first).detach().requires_grad_(True)
    with torch.enable_grad():
        through_score = vector_jacobian_products(step.phi(ev.x.detach(), score), score, tildes)
    h_terms = vector_jacobian_products(g_first, ev.x, through_score)
    return list(zip(tildes, plain, h_terms))


def _difference_products(step, ev, plan, hessian, level, fd_step, stack=None):
    """[[(g_tilde_j, term, H-term or None)] per first condition] by forward differences.

    J_Phi is symmetric (Phi = a x + c (s + g_i) + sigma z with s and g_i gradients of scalar
    functions, rho_i held), so J_Phi^T v = J_Phi v ~ (Phi(x + h v) - Phi(x)) / h with h ||v|| =
    fd_step ||x|| per sample, s and g_i at x + h v from one network pass (rho_i held at its value
    at x_t).  The differences of Phi are taken in float64 (the x part is then exact); ``term``
    moves s only, the H-term moves g_i only."""
    x = ev.x.detach()
    t_hat, abar_hat = step.level(level)
    x_hats = [step.phi(x, ev.score.detach() + ev.grads[i].detach()).detach() for i, _ in plan]
    at_hat = evaluate_points(step.model, x_hats, t_hat, abar_hat, [[step.conditions[j] for j in js] for _, js in plan],
                             stack=stack, gain=step.gain)
    jobs = [(k, i, g) for k, ((i, _), e) in enumerate(zip(plan, at_hat)) for g in e.grads]
    x_norm = _per_sample(x)
    steps = [_col(fd_step * x_norm / _per_sample(v).clamp_min(1e-30), x.ndim) for _, _, v in jobs]
    points = [x + h * v for h, (_, _, v) in zip(steps, jobs)]
    at_points = evaluate_points(step.model, points, step.t, step.abar_t,
                                [[step.conditions[i]] if hessian else [] for _, i, _ in jobs],
                                [[ev.rhos[i]] if hessian else [] for _, i, _ in jobs], stack=stack, gain=step.gain)
    f64 = torch.float64
    z, s0 = step.z.to(f64), ev.score.detach().to(f64)

    def phi(point, score):
        return step.solver.step(point.to(f64), score, z, step.abar_t, step.abar_next)

    bases = {i: phi(x, s0 + ev.grads[i].detach().to(f64)) for i, _ in plan}
    out: list[list] = [[] for _ in plan]
    for (k, i, v), h, point, e in zip(jobs, steps, points, at_points):
        h64, g0 = h.to(f64), ev.grads[i].detach().to(f64)
        moved = phi(point, e.score.to(f64) + g0)
        term = ((moved - bases[i]) / h64).to(x.dtype)
        h_term = ((phi(point, e.score.to(f64) + e.grads[0].to(f64)) - moved) / h64).to(x.dtype) if hessian else None
        out[k].append((v, term, h_term))
    return out


def _capped(v: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """v scaled per sample so that its norm is at most ``limit``."""
    norm = v.flatten(1).norm(dim=1)
    factor = torch.where(norm > limit, limit / norm.clamp_min(1e-30), torch.ones_like(norm))
    return v * factor.view(-1, *([1] * (v.ndim - 1)))


def vector_jacobian_products(output: torch.Tensor, inputs: torch.Tensor,
                             cotangents: list[torch.Tensor]) -> list[torch.Tensor]:
    """v^T d(output)/d(inputs) for each v; one batched backward when autograd can vmap it."""
    if len(cotangents) > 1:
        try:
            (vjps,) = torch.autograd.grad(output, inputs, grad_outputs=torch.stack(cotangents),
                                          retain_graph=True, is_grads_batched=True)
            return list(vjps.unbind(0))
        except RuntimeError:  # some kernels have no batching rule: one backward per cotangent
            pass
    return [torch.autograd.grad(output, inputs, grad_outputs=v, retain_graph=True)[0] for v in cotangents]


class SumOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SumCombiner(Combiner):
    """G = sum_i g_i: the conditions are treated as independent given x_t (FreeDoM, UGD)."""

    Options = SumOptions

    def combine(self, step):
        ev = step.base()
        return Combined(torch.stack([g.detach() for g in ev.grads]).sum(0))


Bound = Optional[Union[Annotated[float, Field(gt=0)], Literal["none"]]]


def _bound(value) -> Optional[float]:
    return None if value is None or value == "none" else float(value)


class _ConditionalOptions(BaseModel):
    """Options of g_{j|i} shared by both combiners that use it."""

    model_config = ConfigDict(extra="forbid")
    hessian: bool = Field(True, description="keep the H_1 g_tilde term (False: g_1 detached in x_hat)")
    level: Literal["t_next", "t"] = Field(
        "t_next", description="level at which the second condition is evaluated on x_hat")
    product: Literal["difference", "autograd"] = Field(DEFAULT_PRODUCT, description=(
        "how J_Phi^T g_tilde is computed: 'difference' = forward difference of the step map along "
        "g_tilde (J_Phi is symmetric; one more network pass, no double backward), 'autograd' = the "
        "exact vector-Jacobian product (double backward through the network)"))
    fd_step: float = Field(FD_STEP, gt=0, lt=1, description=(
        "relative step of the forward difference: h ||g_tilde|| = fd_step ||x_t||"))
    bound: Bound = Field(DEFAULT_BOUND, description=(
        "trust region of the Hessian term: ||H_1 g_tilde term|| <= bound * ||g_tilde|| per sample "
        "(docs/method.md); 'none' = the paper's update"))
    cap: Optional[float] = Field(None, gt=0, description=(
        "cap ||g_{2|1}|| at cap * ||g_tilde|| per sample (the whole conditional term; off by default)"))
    project: Literal["none", "hessian", "conditional"] = Field(DEFAULT_PROJECT, description=(
        "remove the component along the score s(x_t), which changes x_t's noise level rather than its "
        "content, from the whole g_{2|1} ('conditional', default) or from its Hessian term only ('hessian'); "
        "'none' = the paper's update (docs/method.md)"))


class DependentOptions(_ConditionalOptions):
    trace_cosine: bool = Field(False, description=(
        "also compute g2 at x_t (one more backward pass, not needed for G) so the trace has cos(g1, g2)"))


class DependentCombiner(Combiner):
    """Algorithm 1: G = g_1 + g_{2|1}, the second condition seen through the first one's step.

    The default evaluates g_tilde at level t', where x_hat actually lives after the step, takes
    J_Phi g_tilde by a forward difference, bounds the Hessian term and removes g_{2|1}'s component along the
    score (docs/method.md);
    ``product='autograd', bound='none', project='none'`` is the paper's exact update.
    """

    Options = DependentOptions
    min_conditions = 2
    max_conditions = 2

    def __init__(self, hessian: bool = True, level: str = "t_next", cap: Optional[float] = None,
                 product: str = DEFAULT_PRODUCT, fd_step: float = FD_STEP, bound=DEFAULT_BOUND,
                 trace_cosine: bool = False, project: str = DEFAULT_PROJECT):
        _check_choices(product, project)
        self.hessian, self.level, self.cap, self.project = hessian, level, cap, project
        self.product, self.fd_step, self.bound, self.trace_cosine = product, fd_step, _bound(bound), trace_cosine

    def combine(self, step):
        if len(step.conditions) < 2:  # the other condition is outside its window
            return SumCombiner().combine(step)
        # G needs g1 at x_t only; g2 there feeds nothing but the trace's cos(g1, g2).
        guided = [True, self.trace_cosine]
        if self.product == "autograd":  # g1 differentiable again (Hessian term), the graph kept for the VJP
            hessian = hessian_term_wanted(step, self.hessian, self.bound)
            ev = step.base(create_graph=[hessian, False], guided=guided, keep_graph=True)
        else:
            ev = step.base(guided=guided, keep_graph=False)
        info: dict = {}
        (g21,) = conditional_gradients(step, ev, 0, [1], self.hessian, self.level, self.cap, product=self.product,
                                       bound=self.bound, fd_step=self.fd_step, project=self.project, info=info)
        g1 = ev.grads[0].detach()
        return Combined(g1 + g21, {"cos(g1,g2|1)": cosine(g1, g21), **info})


class CAGradOptions(_ConditionalOptions):
    stack: Optional[int] = Field(None, ge=1, description=(
        "difference product: at most this many points per stacked network call (memory grows with the "
        "stack, n(n-1) points for the pairs); None = all in one call. A call that runs out of device memory "
        "is retried with half as many points, and the run goes on at that size (reported)"))
    c: float = Field(0.5, ge=0.0, lt=1.0, description="radius of the conflict-averse ball, c in [0, 1)")
    rescale: Literal["none", "1/(1+c^2)", "1/(1+c)"] = Field(DEFAULT_RESCALE, description=(
        "rescaling of the direction: '1/(1+c)' (default) keeps ||G|| <= ||mean of the pair gradients||; "
        "'1/(1+c^2)' as CAGrad's published code (docs/method.md); 'none' is the paper's"))


class CAGradCombiner(Combiner):
    """Algorithm 2: the conflict-averse direction over all ordered pair gradients g_ij = g_i + g_{j|i}.

    Defaults as dependent's (difference product, bounded Hessian term, no score component) and the direction rescaled by
    1/(1+c); ``product='autograd', bound='none', project='none', rescale='none'`` is the paper's exact update."""

    Options = CAGradOptions
    min_conditions = 2

    def __init__(self, c: float = 0.5, rescale: str = DEFAULT_RESCALE, hessian: bool = True, level: str = "t_next",
                 cap: Optional[float] = None, product: str = DEFAULT_PRODUCT, fd_step: float = FD_STEP,
                 bound=DEFAULT_BOUND, stack: Optional[int] = None, project: str = DEFAULT_PROJECT):
        _check_choices(product, project)
        self.c, self.rescale, self.hessian, self.level, self.cap = c, rescale, hessian, level, cap
        self.project = project
        self.product, self.fd_step, self.bound = product, fd_step, _bound(bound)
        self.stack_limit = StackLimit(stack)  # the points per call; lowered for good if a call runs out of memory

    def pair_gradients(self, step, info: Optional[dict] = None) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """All ordered pairs (i, j) and their gradients, shape (m, B, ...)."""
        n = len(step.conditions)
        if self.product == "autograd":
            ev = step.base(create_graph=hessian_term_wanted(step, self.hessian, self.bound), keep_graph=True)
        else:
            ev = step.base(keep_graph=False)
        plan = [(i, [j for j in range(n) if j != i]) for i in range(n)]
        terms = pair_conditional_gradients(step, ev, plan, self.hessian, self.level, self.cap, product=self.product,
                                           bound=self.bound, fd_step=self.fd_step, project=self.project, info=info,
                                           stack=self.stack_limit)
        pairs, grads = [], []
        for (i, others), row in zip(plan, terms):
            for j, g_ji in zip(others, row):
                pairs.append((i, j))
                grads.append(ev.grads[i].detach() + g_ji)
        return pairs, torch.stack(grads)

    def combine(self, step):
        if len(step.conditions) < 2:
            return SumCombiner().combine(step)
        info: dict = {}
        pairs, grads = self.pair_gradients(step, info)
        per_sample = grads.transpose(0, 1).flatten(2)  # (B, m, D): every sample is its own problem
        d, w = cagrad_directions(per_sample, self.c, self.rescale)
        if self.stack_limit.lowered:  # the trace shows from which step on the points went in smaller calls
            info["stack"] = torch.full((d.shape[0],), float(self.stack_limit.size), device=d.device)
        names = [c.name for c in step.conditions]
        weights = torch.as_tensor(w, dtype=torch.float64)
        # one (B,) entry per pair, so each sample's trace shows which pairs its direction leaned on (c = 0: all 1/m)
        per_pair = {f"w({names[i]}>{names[j]})": weights[:, p] for p, (i, j) in enumerate(pairs)} if self.c else {}
        return Combined(d.view_as(grads[0]), {"pairs": pairs, "weights": w.tolist(), **per_pair, **info})
