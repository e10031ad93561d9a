"""The CAGrad dual on the probability simplex, compiled once with cvxpy (METHOD.md section 4).

    w* = argmin_{w in simplex} (K 1/m)^T w + sqrt(phi) ||R w||,   K = G G^T = R^T R,
    d  = g0 + sqrt(phi) / ||g_w*|| g_w*,   g0 = mean of the rows of G,   phi = c^2 ||g0||^2.

Every sample of a batch is its own problem, compiled once per m with parameters and re-solved for
each sample at every step: a sample's weights never depend on the other samples of its batch (a
block problem over the batch is faster per problem, ~0.2 ms against ~1 ms, but the solver's stopping
rule then couples the samples).  The problem stays DPP: sqrt(phi) is multiplied into R's value, not
kept as a parameter.
"""
from __future__ import annotations

import numpy as np
import torch

_PROBLEMS: dict[tuple[int, int], "SimplexSOCP"] = {}


class SimplexSOCP:
    """For b = 1..B: min_w b_b^T w_b + ||A_b w_b|| subject to w_b >= 0, sum w_b = 1."""

    def __init__(self, batch: int, m: int):
        import cvxpy as cp

        self.batch, self.m = batch, m
        self.A = [cp.Parameter((m, m)) for _ in range(batch)]
        if batch == 1:  # the plain form: fewer expression nodes, a faster re-solve
            w = cp.Variable(m, nonneg=True)
            b = cp.Parameter(m)
            objective, rows = b @ w + cp.norm(self.A[0] @ w, 2), [w]
            constraints = [cp.sum(w) == 1]
        else:
            w = cp.Variable((batch, m), nonneg=True)
            b = cp.Parameter((batch, m))
            rows = [w[i] for i in range(batch)]
            objective = cp.sum(cp.multiply(b, w)) + sum(cp.norm(A @ r, 2) for A, r in zip(self.A, rows))
            constraints = [cp.sum(w, axis=1) == 1]
        self.w, self.b = w, b
        self.problem = cp.Problem(cp.Minimize(objective), constraints)
        self.solves = 0

    def solve(self, b: np.ndarray, A: np.ndarray) -> np.ndarray:
        self.b.value = b.reshape(self.b.shape)
        for param, value in zip(self.A, A):
            param.value = value
        try:
            self.problem.solve(solver="CLARABEL", warm_start=False)  # cold: no dependence on earlier solves
        except Exception:  # numerical trouble: the first-order solver is slower but more forgiving
            self.problem.solve(solver="SCS", eps=1e-9, warm_start=False)
        self.solves += 1
        w = None if self.w.value is None else self.w.value.reshape(self.batch, self.m)
        uniform = np.full((self.batch, self.m), 1.0 / self.m)
        if w is None:
            return uniform
        w = np.clip(w, 0.0, None)
        sums = w.sum(1, keepdims=True)
        ok = np.isfinite(w).all(1, keepdims=True) & (sums > 0)
        return np.where(ok, w / np.where(ok, sums, 1.0), uniform)


def simplex_problem(batch: int, m: int) -> SimplexSOCP:
    """The compiled problem for this batch size and number of pair gradients (built once)."""
    if (batch, m) not in _PROBLEMS:
        _PROBLEMS[(batch, m)] = SimplexSOCP(batch, m)
    return _PROBLEMS[(batch, m)]


def cagrad_weights_batch(grams: np.ndarray, c: float) -> np.ndarray:
    """w* (B, m) for a stack of Gram matrices K (B, m, m), in float64."""
    batch, m = grams.shape[:2]
    scale = np.trace(grams, axis1=1, axis2=2) / m
    good = np.isfinite(scale) & (scale > 0)
    # The argmin is invariant to the gradients' scale; normalising keeps the solver well-conditioned.
    K = grams / np.where(good, scale, 1.0)[:, None, None]
    K = np.where(good[:, None, None], K, np.eye(m))
    sqrt_phi = c * np.sqrt(np.clip(K.mean(axis=(1, 2)), 0.0, None))  # ||g0||^2 = 1^T K 1 / m^2
    eigval, eigvec = np.linalg.eigh(K)
    R = np.sqrt(np.clip(eigval, 0.0, None))[:, :, None] * np.swapaxes(eigvec, 1, 2)  # K = R^T R
    problem, A = simplex_problem(1, m), sqrt_phi[:, None, None] * R
    w = np.concatenate([problem.solve(K[i].mean(axis=1), A[i:i + 1]) for i in range(batch)])
    w[~good] = 1.0 / m
    return w


def cagrad_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """w* for one Gram matrix K (m x m)."""
    return cagrad_weights_batch(gram[None], c)[0]


def cagrad_directions(grads: torch.Tensor, c: float, rescale: str = "none") -> tuple[torch.Tensor, np.ndarray]:
    """CAGrad's direction for every sample: grads (B, m, D) -> (d (B, D), w* (B, m))."""
    g = grads.detach().double()
    batch, m = g.shape[:2]
    g0 = g.mean(dim=1)
    if c == 0.0:
        d, w = g0, np.full((batch, m), 1.0 / m)
    else:
        w = cagrad_weights_batch((g @ g.transpose(1, 2)).cpu().numpy(), c)
        gw = torch.einsum("bm,bmd->bd", torch.as_tensor(w, dtype=g.dtype, device=g.device), g)
        gw_norm = gw.norm(dim=1, keepdim=True)
        step = torch.where(gw_norm > 1e-30, c * g0.norm(dim=1, keepdim=True) / gw_norm.clamp_min(1e-30),
                           torch.zeros_like(gw_norm))
        d = g0 + step * gw
    if rescale == "1/(1+c^2)":
        d = d / (1.0 + c**2)
    elif rescale == "1/(1+c)":
        d = d / (1.0 + c)
    return d.to(grads.dtype), w


def cagrad_direction(grads: torch.Tensor, c: float, rescale: str = "none") -> tuple[torch.Tensor, np.ndarray]:
    """The direction for one sample's pair gradients (m, D)."""
    d, w = cagrad_directions(grads[None], c, rescale)
    return d[0], w[0]
