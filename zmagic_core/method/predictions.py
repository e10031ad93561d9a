"""Prediction types and noise schedules (METHOD.md section 1): every network output becomes an
epsilon prediction, and the clean estimate the energies see is Tweedie's formula on it.

    x_t = sqrt(abar) x0 + sqrt(1-abar) eps,   score s(x_t) = -eps / sqrt(1-abar),
    x0|t = (x_t - sqrt(1-abar) eps) / sqrt(abar).
"""
from __future__ import annotations

import math

import torch

from zmagic_core.contracts.errors import ConfigError


def tweedie_x0(x_t: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """The clean estimate x0|t from an epsilon prediction."""
    return (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)


def score_from_eps(eps: torch.Tensor, abar: float) -> torch.Tensor:
    """s(x_t) = -eps / sqrt(1 - abar); zero at abar = 1 (no noise left)."""
    return -eps / math.sqrt(1.0 - abar) if abar < 1.0 else torch.zeros_like(eps)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def output_to_eps(out: torch.Tensor, x_t: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """The network output converted to an epsilon prediction (all in float32).

    x_t = sqrt(abar) x0 + sqrt(1-abar) eps;  v = sqrt(abar) eps - sqrt(1-abar) x0, so
    eps = sqrt(abar) v + sqrt(1-abar) x_t;  from x0: eps = (x_t - sqrt(abar) x0) / sqrt(1-abar).
    """
    if prediction_type == "epsilon":
        return out
    a, s = math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))
    if prediction_type == "v_prediction":
        return a * out + s * x_t
    if prediction_type == "sample":
        return (x_t - a * out) / max(s, 1e-12)
    raise ConfigError(f"prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")


def _betas_for_alpha_bar(num: int, max_beta: float = 0.999) -> torch.Tensor:
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / num) / abar(i / num), max_beta) for i in range(num)],
                        dtype=torch.float64)


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """abar_t in float64 from a diffusers scheduler config (the same betas its schedulers build)."""
    num = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
    elif schedule == "linear":
        betas = torch.linspace(start, end, num, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, num, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(num)
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, num, dtype=torch.float64)) * (end - start) + start
    else:
        raise ConfigError(f"beta_schedule {schedule!r} is not supported (linear, scaled_linear, "
                          f"squaredcos_cap_v2, sigmoid or trained_betas)")
    if not bool(((betas > 0) & (betas < 1)).all()):  # else abar reaches 0 or leaves (0, 1]: every step fails
        raise ConfigError(f"the noise schedule's betas must lie in (0, 1); beta_schedule {schedule!r} with "
                          f"beta_start {start}, beta_end {end} gives {float(betas.min()):.3g} to {float(betas.max()):.3g}")
    if config.get("rescale_betas_zero_snr"):
        raise ConfigError("rescale_betas_zero_snr gives abar_T = 0, where the Tweedie estimate "
                          "x0 = (x - sqrt(1-abar) eps) / sqrt(abar) is undefined; not supported")
    return torch.cumprod(1.0 - betas, dim=0)
