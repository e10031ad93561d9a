"""Reverse-step maps Phi_t(x_t, score, z) (METHOD.md section 3).

Each is a few lines of tensor maths, differentiable in x_t and in the score, so the dependent
combiner can take vector-Jacobian products through a step.  Guidance enters only through the
score argument.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from zmagic_core.contracts.components import Solver
from zmagic_core.method.schedule import Schedule


class DDPMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DDPMSolver(Solver):
    """Ancestral step for the VP SDE, the paper's form:
    Phi = (2 - sqrt(1 - beta)) x + beta * score + sqrt(beta) z."""

    Options = DDPMOptions

    def step(self, x, score, z, abar_t, abar_next):
        beta = Schedule.beta_eff(abar_t, abar_next)
        return (2.0 - math.sqrt(1.0 - beta)) * x + beta * score + math.sqrt(beta) * z


PULLS = ("matched", "raw", "consistent")
# The deterministic step's share of the raw pull under "matched": calibrated on held-out scenarios so that DDIM
# with 50 steps lands where DDPM with 100 does at the same scale (docs/method.md, benchmarks/ddim_pull.py).
MATCHED_GAIN = 0.25


class DDIMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="0: deterministic DDIM; 1: DDPM-like noise")
    pull: Literal["matched", "raw", "consistent"] = Field(
        "matched", description="matched (default): energy guidance calibrated so that a scale tuned under ddpm gives "
                               "the same samples (the raw pull times 0.25 at eta = 0, moving to 'consistent' as eta "
                               "-> 1; docs/method.md); raw: the guided score used as given (FreeDoM's guided DDIM); "
                               "consistent: guidance moves x_t' as far as in the ancestral step (step sizes times "
                               "beta_eff / (dPhi/dscore), about 2)")


class DDIMSolver(Solver):
    """DDIM(eta) written in terms of the score: eps_hat = -sqrt(1 - abar_t) * score."""

    Options = DDIMOptions

    def __init__(self, eta: float = 0.0, pull: str = "matched"):
        if pull not in PULLS:
            raise ValueError(f"pull must be one of {PULLS}, got {pull!r}")
        self.eta, self.pull = eta, pull

    def _coefficients(self, abar_t, abar_next):
        """(sigma, direction) of the step: x_t' = sqrt(abar') x0_hat + direction eps_hat + sigma z."""
        sigma = self.eta * math.sqrt((1.0 - abar_next) / (1.0 - abar_t) * (1.0 - abar_t / abar_next))
        return sigma, math.sqrt(max(1.0 - abar_next - sigma**2, 0.0))

    def step(self, x, score, z, abar_t, abar_next):
        eps_hat = -math.sqrt(1.0 - abar_t) * score
        x0_hat = (x - math.sqrt(1.0 - abar_t) * eps_hat) / math.sqrt(abar_t)
        sigma, direction = self._coefficients(abar_t, abar_next)
        return math.sqrt(abar_next) * x0_hat + direction * eps_hat + sigma * z

    def score_coefficient(self, abar_t: float, abar_next: float) -> float:
        """dPhi/dscore (the step is affine in the score): sqrt(abar'/abar) (1 - abar) - direction sqrt(1 - abar)."""
        _, direction = self._coefficients(abar_t, abar_next)
        return math.sqrt(abar_next / abar_t) * (1.0 - abar_t) - direction * math.sqrt(1.0 - abar_t)

    def guidance_gain(self, abar_t, abar_next):
        """The factor on the energies' step sizes.  consistent: beta_eff / (dPhi/dscore), about 2 for small
        deterministic steps, where the probability-flow ODE moves with half the reverse SDE's score.  matched:
        MATCHED_GAIN at eta = 0 (the ODE keeps every displacement guidance makes: no noise forgets it, so the
        same pull does more), moving linearly to consistent with the step's noise fraction
        sigma / sqrt(beta_eff) (1 at eta = 1, where the step is ancestral)."""
        if self.pull == "raw":
            return 1.0
        beta = Schedule.beta_eff(abar_t, abar_next)
        coefficient = self.score_coefficient(abar_t, abar_next)
        consistent = beta / coefficient if coefficient > 0 else 1.0
        if self.pull == "consistent":
            return consistent
        sigma, _ = self._coefficients(abar_t, abar_next)
        noise = min(sigma / math.sqrt(beta), 1.0) if beta > 0 else 0.0
        return MATCHED_GAIN + (consistent - MATCHED_GAIN) * noise


class PCOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corrector_steps: int = Field(1, ge=0, le=20, description="Langevin corrector steps M")
    snr: float = Field(0.16, gt=0.0, description="signal-to-noise ratio that sets the corrector step")


class PCSolver(DDPMSolver):
    """Predictor-corrector (Song et al.): the ancestral predictor, then M Langevin moves
    x <- x + delta * score + sqrt(2 delta) z', delta = 2 (snr ||z'|| / ||score||)^2 per sample."""

    Options = PCOptions

    def __init__(self, corrector_steps: int = 1, snr: float = 0.16):
        self.corrector_steps = corrector_steps
        self.snr = snr

    def correct(self, x, score, z):
        dims = tuple(range(1, x.ndim))
        z_norm = z.flatten(1).norm(dim=1)
        s_norm = score.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = (2.0 * (self.snr * z_norm / s_norm) ** 2).view(-1, *([1] * len(dims)))
        return x + delta * score + torch.sqrt(2.0 * delta) * z
