"""Flow matching (SD3, FLUX) as a VP process in rescaled coordinates (docs/method.md, "Flow matching").

A rectified-flow model is trained on the straight path x_s = (1 - s) x0 + s eps (noise level s in
(0, 1]) and predicts the velocity v = dx_s/ds = eps - x0.  Dividing by the path's norm,

    k(s) = 1 / sqrt((1 - s)^2 + s^2),   x_vp = k(s) x_s = sqrt(abar) x0 + sqrt(1 - abar) eps,
    abar(s) = (1 - s)^2 / ((1 - s)^2 + s^2),

is exactly a VP point with the same x0 and eps.  So a flow model is a :class:`DiffusionModel`
whose eps comes from the velocity (eps = x_s + (1 - s) v, x0 = x_s - s v), and every solver,
combiner and energy works on it unchanged.  The flow Euler step x_s' = x_s + (s' - s) v is the
DDIM(eta=0) step in these coordinates (both put the same x0 and eps at the next level):
F(x_s) = D(k x_s) / k', so dF/dx_s = (k / k') dD/dx_vp, and the map Phi whose vector-Jacobian
products the combiners take is the DDIM map up to these scalars; the `ddpm` ancestral step in VP
coordinates is its stochastic analogue.

Guidance: score_flow = k score_vp and grad_{x_s} E = k grad_{x_vp} E, so a term G_vp = -rho grad E
on the VP score is G_flow = k G_vp on the flow score (the same rho), and the guided velocity is
v - s / (1 - s) G_flow.  A conditional term J^T g_tilde obeys the same relation, so the combiners'
products need no change, and a scale pulls as far per unit of -log abar as on a VP model.
"""
from __future__ import annotations

import abc
import math
from typing import Union

import torch

from zmagic_core.contracts.components import DiffusionModel, Prediction

Number = Union[float, torch.Tensor]

# the largest noise level a schedule visits: at s = 1 the clean estimate from a VP point is 0/0
MAX_SIGMA = 1.0 - 1e-4


def vp_scale(sigma: Number) -> Number:
    """k(s) = 1 / sqrt((1 - s)^2 + s^2): x_vp = k x_s."""
    return 1.0 / ((1.0 - sigma) ** 2 + sigma ** 2) ** 0.5


def flow_abar(sigma: Number) -> Number:
    """abar of the VP point equivalent to noise level s: (1 - s)^2 / ((1 - s)^2 + s^2)."""
    return (1.0 - sigma) ** 2 / ((1.0 - sigma) ** 2 + sigma ** 2)


def sigma_from_abar(abar: Number) -> Number:
    """The inverse of :func:`flow_abar`: s = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar))."""
    a, b = abar ** 0.5, (1.0 - abar) ** 0.5
    return b / (a + b)


def eps_from_velocity(v: torch.Tensor, x_flow: torch.Tensor, sigma: float) -> torch.Tensor:
    """eps = x_s + (1 - s) v."""
    return x_flow + (1.0 - sigma) * v


def x0_from_velocity(v: torch.Tensor, x_flow: torch.Tensor, sigma: float) -> torch.Tensor:
    """The clean estimate x0 = x_s - s v (the same as Tweedie's formula at the VP point)."""
    return x_flow - sigma * v


def velocity_from_score(score: torch.Tensor, x_flow: torch.Tensor, sigma: float) -> torch.Tensor:
    """v = (eps - x_s) / (1 - s) with eps = -s * score(x_s): a guidance term G added to the score
    of x_s moves the velocity by -s / (1 - s) * G."""
    return (-sigma * score - x_flow) / (1.0 - sigma)


def euler_step(x_flow: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The flow-matching Euler step x_s' = x_s + (s' - s) v (FlowMatchEulerDiscreteScheduler)."""
    return x_flow + (sigma_next - sigma) * v


def shift_sigmas(s: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """SD3's resolution shift: s -> shift * s / (1 + (shift - 1) s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def exponential_shift(s: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's dynamic shift: s -> e^mu / (e^mu + (1 / s - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))


def flow_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """Noise level s of every training timestep t = 0..T-1: s = (t + 1) / T, shifted, capped below 1."""
    s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    s = exponential_shift(s, mu) if mu is not None else shift_sigmas(s, shift)
    return s.clamp(max=MAX_SIGMA)


def flow_alphas_cumprod(num_train_timesteps: int = 1000, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """abar at every training timestep of a flow schedule (float64), for :class:`DiffusionModel`."""
    return flow_abar(flow_sigmas(num_train_timesteps, shift, mu))


class FlowModel(DiffusionModel):
    """A velocity network v(x_s, s) presented as a VP epsilon model (see the module docstring).

    Subclasses set ``alphas_cumprod`` with :func:`flow_alphas_cumprod` and implement
    :meth:`velocity`; the sampler's state is the VP point x_vp, and the final step (abar = 1) ends
    on x0 itself, where both coordinates agree.
    """

    @abc.abstractmethod
    def velocity(self, x_flow: torch.Tensor, t: int, sigma: float) -> torch.Tensor:
        """The network's velocity at flow point x_s of timestep t (noise level s), float32."""

    def sigma(self, t: int) -> float:
        return float(sigma_from_abar(float(self.alphas_cumprod[t])))

    def predict(self, x_t: torch.Tensor, t: int) -> Prediction:
        sigma = self.sigma(t)
        x_flow = x_t / vp_scale(sigma)
        v = self.velocity(x_flow, t, sigma)
        return Prediction(eps_from_velocity(v, x_flow, sigma), x0_from_velocity(v, x_flow, sigma))

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        return self.predict(x_t, t).eps
