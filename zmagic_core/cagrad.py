"""The CAGrad dual on the probability simplex, compiled once with cvxpy (METHOD.md section 4).

    w* = argmin_{w in simplex} (K 1/m)^T w + sqrt(phi) ||R w||,   K = G G^T = R^T R,
    d  = g0 + sqrt(phi) / ||g_w*|| g_w*,   g0 = mean of the rows of G,   phi = c^2 ||g0||^2.

The problem is built once per size m with parameters (kept DPP: sqrt(phi) is multiplied into
R's value), then re-solved for every sample and step.
"""
from __future__ import annotations

import numpy as np
import torch

_PROBLEMS: dict[int, "SimplexSOCP"] = {}


class SimplexSOCP:
    """min_w b^T w + ||A w|| subject to w >= 0, sum w = 1, for fixed m."""

    def __init__(self, m: int):
        import cvxpy as cp

        self.m = m
        self.w = cp.Variable(m, nonneg=True)
        self.b = cp.Parameter(m)
        self.A = cp.Parameter((m, m))
        objective = cp.Minimize(self.b @ self.w + cp.norm(self.A @ self.w, 2))
        self.problem = cp.Problem(objective, [cp.sum(self.w) == 1])
        self.solves = 0

    def solve(self, b: np.ndarray, A: np.ndarray) -> np.ndarray:
        self.b.value, self.A.value = b, A
        try:
            self.problem.solve(solver="CLARABEL")
        except Exception:  # fall back to the first-order solver on numerical trouble
            self.problem.solve(solver="SCS", eps=1e-9)
        self.solves += 1
        w = self.w.value
        if w is None or not np.all(np.isfinite(w)):
            return np.full(self.m, 1.0 / self.m)
        w = np.clip(w, 0.0, None)
        return w / w.sum()


def simplex_problem(m: int) -> SimplexSOCP:
    """The compiled problem of size m (built on first use, then reused)."""
    if m not in _PROBLEMS:
        _PROBLEMS[m] = SimplexSOCP(m)
    return _PROBLEMS[m]


def cagrad_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """w* for one Gram matrix K (m x m) of the pair gradients, in float64."""
    m = gram.shape[0]
    scale = np.trace(gram) / m
    if scale <= 0 or not np.isfinite(scale):
        return np.full(m, 1.0 / m)
    K = gram / scale  # the argmin is invariant to the gradients' scale; this keeps it well-conditioned
    g0_sq = K.mean()  # ||g0||^2 = 1^T K 1 / m^2
    sqrt_phi = c * np.sqrt(max(g0_sq, 0.0))
    eigval, eigvec = np.linalg.eigh(K)
    R = np.sqrt(np.clip(eigval, 0.0, None))[:, None] * eigvec.T  # K = R^T R
    return simplex_problem(m).solve(K.mean(axis=1), sqrt_phi * R)


def cagrad_direction(grads: torch.Tensor, c: float, rescale: str = "none") -> tuple[torch.Tensor, np.ndarray]:
    """CAGrad's conflict-averse direction for the rows of ``grads`` (m x D); returns (d, w*)."""
    g = grads.detach().double()
    m = g.shape[0]
    g0 = g.mean(dim=0)
    if c == 0.0:
        return g0.to(grads.dtype), np.full(m, 1.0 / m)
    w = cagrad_weights((g @ g.T).cpu().numpy(), c)
    gw = torch.as_tensor(w, dtype=g.dtype, device=g.device) @ g
    gw_norm = gw.norm()
    d = g0 if gw_norm <= 1e-30 else g0 + (c * g0.norm() / gw_norm) * gw
    if rescale == "1/(1+c^2)":
        d = d / (1.0 + c**2)
    elif rescale == "1/(1+c)":
        d = d / (1.0 + c)
    return d.to(grads.dtype), w
