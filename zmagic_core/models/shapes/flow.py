"""The shapes world as a flow-matching model (docs/method.md, "Flow matching").

The same mixture p(x0) = sum_k w_k N(x0; mu_k, sigma0^2 I) on the straight path
x_s = (1 - s) x0 + s eps: component k gives x_s ~ N((1 - s) mu_k, v_s I), v_s = (1 - s)^2 sigma0^2 + s^2,
so the exact velocity E[eps - x0 | x_s] is closed-form, by responsibilities r_k(x_s):

    E[x0 | x_s, k]  = mu_k + (1 - s) sigma0^2 / v_s (x_s - (1 - s) mu_k)
    E[eps | x_s, k] = s / v_s (x_s - (1 - s) mu_k)

The sampler sees it through :class:`FlowModel` (VP coordinates x_vp = k(s) x_s), where its marginal
is the VP shapes world's at the same abar: ``score``, ``responsibilities`` and ``log_density``
inherited from :class:`ShapesModel` are those of the VP point, exactly.
"""
from __future__ import annotations

import copy

import torch

from zmagic_core.method.flow import FlowModel, flow_alphas_cumprod
from zmagic_core.models.shapes.world import ShapesModel, per_sample_matmul


class ShapesFlowModel(FlowModel, ShapesModel):
    """The shapes mixture with its exact flow-matching velocity v(x_s, s).

    A :class:`ShapesModel` too (same prototypes, weights and buffers; only the schedule and the
    prediction differ), so the shapes energies, the evaluator and the oracle take it unchanged.
    ``shift``: SD3's schedule shift of the noise levels (1: none)."""

    def __init__(self, size: int = 32, sigma0: float = 0.1, shift: float = 1.0, num_train_timesteps: int = 1000,
                 **world):
        super().__init__(size=size, sigma0=sigma0, num_train_timesteps=num_train_timesteps, **world)
        self.shift = shift
        self.alphas_cumprod = flow_alphas_cumprod(num_train_timesteps, shift)

    def velocity(self, x_flow: torch.Tensor, t: int, sigma: float) -> torch.Tensor:
        a = 1.0 - sigma  # the path's weight on x0
        var = a * a * self.sigma0**2 + sigma * sigma
        flat = x_flow.to(self.mu.dtype).flatten(1)
        # the mixture in flow coordinates is ShapesModel's with sqrt(abar) -> 1 - s and variance v_s
        r = torch.softmax(self._logits(flat, self.mu.new_tensor(a * a), self.mu.new_tensor(var)), dim=1)
        mean = per_sample_matmul(r, self.mu)  # E[mu_k | x_s]
        residual = flat - a * mean  # x_s - (1 - s) E[mu_k | x_s]
        eps = sigma / var * residual
        x0 = mean + a * self.sigma0**2 / var * residual
        return (eps - x0).view_as(x_flow).to(x_flow.dtype)

    def conditioned(self, log_weights: torch.Tensor) -> "ShapesFlowModel":
        """The exact conditional flow model: the same prototypes reweighted by p(c | k)."""
        weights = ShapesModel.conditioned(self, log_weights).log_weights
        other = copy.copy(self)
        other._buffers = dict(self._buffers)  # a shallow copy would share the buffer dict: give it its own
        other.log_weights = weights
        return other
