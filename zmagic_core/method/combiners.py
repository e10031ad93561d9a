"""Gradient combiners (METHOD.md section 4): sum, dependent (Algorithm 1), cagrad (Algorithm 2)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from zmagic_core.method.cagrad import cagrad_directions
from zmagic_core.contracts.components import Combined, Combiner
from zmagic_core.method.guidance import Evaluation, GuidanceStep


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per sample between two batched tensors."""
    a, b = a.detach().flatten(1), b.detach().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def conditional_gradients(step: GuidanceStep, ev: Evaluation, first: int, seconds: list[int],
                          hessian: bool, level: str, cap: Optional[float] = None) -> list[torch.Tensor]:
    """g_{j|i} for one first condition i and several second conditions j (Algorithm 1, steps 2-4).

    x_hat = Phi_t(x_t, s(x_t) + g_i, z) is built once and shared by every j; each g_{j|i} is the
    vector-Jacobian product of that map with stopgrad(g_tilde_j), so no Jacobian or Hessian is
    ever formed.  Without ``hessian`` g_i enters as a constant, dropping the H_i term.
    With ``cap``, each g_{j|i} is scaled down per sample to at most cap * ||g_tilde_j||.
    """
    g_first = ev.grads[first] if hessian else ev.grads[first].detach()
    x_hat = step.phi(ev.x, ev.score + g_first)
    tilde = step.evaluate(x_hat.detach(), level, seconds)
    tildes = [g.detach() for g in tilde.grads]
    vjps = vector_jacobian_products(x_hat, ev.x, tildes)
    if cap is not None:
        vjps = [_capped(v, cap * g.flatten(1).norm(dim=1)) for v, g in zip(vjps, tildes)]
    return vjps


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


class DependentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hessian: bool = Field(True, description="keep the H_1 g_tilde term (False: g_1 detached in x_hat)")
    level: Literal["t_next", "t"] = Field(
        "t_next", description="level at which the second condition is evaluated on x_hat")
    cap: Optional[float] = Field(None, gt=0, description=(
        "cap ||g_{2|1}|| at cap * ||g_tilde|| per sample; None (default) is the paper's update. The Hessian "
        "term is unbounded when the adaptive rho_1 is large (see docs/benchmarks.md)"))


class DependentCombiner(Combiner):
    """Algorithm 1: G = g_1 + g_{2|1}, the second condition seen through the first one's step.

    The default evaluates g_tilde at level t', where x_hat actually lives after the step.
    """

    Options = DependentOptions
    min_conditions = 2
    max_conditions = 2

    def __init__(self, hessian: bool = True, level: str = "t_next", cap: Optional[float] = None):
        self.hessian, self.level, self.cap = hessian, level, cap

    def combine(self, step):
        if len(step.conditions) < 2:  # the other condition is outside its window
            return SumCombiner().combine(step)
        # Only g1 is differentiated again; g2 at x_t is kept for the trace (Figure 1's cosine).
        ev = step.base(create_graph=[self.hessian, False])
        (g21,) = conditional_gradients(step, ev, 0, [1], self.hessian, self.level, self.cap)
        g1 = ev.grads[0].detach()
        return Combined(g1 + g21, {"cos(g1,g2|1)": cosine(g1, g21)})


class CAGradOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    c: float = Field(0.5, ge=0.0, lt=1.0, description="radius of the conflict-averse ball, c in [0, 1)")
    rescale: Literal["none", "1/(1+c^2)", "1/(1+c)"] = "none"
    hessian: bool = True
    level: Literal["t_next", "t"] = "t_next"
    cap: Optional[float] = Field(None, gt=0, description="cap on each ||g_{j|i}|| relative to ||g_tilde_j||")


class CAGradCombiner(Combiner):
    """Algorithm 2: the conflict-averse direction over all ordered pair gradients g_ij = g_i + g_{j|i}."""

    Options = CAGradOptions
    min_conditions = 2

    def __init__(self, c: float = 0.5, rescale: str = "none", hessian: bool = True, level: str = "t_next",
                 cap: Optional[float] = None):
        self.c, self.rescale, self.hessian, self.level, self.cap = c, rescale, hessian, level, cap

    def pair_gradients(self, step) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """All ordered pairs (i, j) and their gradients, shape (m, B, ...)."""
        n = len(step.conditions)
        ev = step.base(create_graph=self.hessian)
        pairs, grads = [], []
        for i in range(n):
            others = [j for j in range(n) if j != i]
            for j, g_ji in zip(others, conditional_gradients(step, ev, i, others, self.hessian, self.level, self.cap)):
                pairs.append((i, j))
                grads.append(ev.grads[i].detach() + g_ji)
        return pairs, torch.stack(grads)

    def combine(self, step):
        if len(step.conditions) < 2:
            return SumCombiner().combine(step)
        pairs, grads = self.pair_gradients(step)
        per_sample = grads.transpose(0, 1).flatten(2)  # (B, m, D): every sample is its own problem
        d, w = cagrad_directions(per_sample, self.c, self.rescale)
        return Combined(d.view_as(grads[0]), {"pairs": pairs, "weights": w.tolist()})
