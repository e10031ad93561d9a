"""The VP noise schedule and the strided subsequence of timesteps a sampler visits."""
from __future__ import annotations

import math

import torch


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                          beta_end: float = 0.02) -> torch.Tensor:
    """abar_t for the linear beta schedule of DDPM (and the CelebA-HQ model)."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def strided_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced timesteps from high to low, ending at 0 (e.g. 990, 980, ..., 0)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    stride = num_train_timesteps // steps
    return list(range(stride * (steps - 1), -1, -stride))


class Schedule:
    """abar at every visited timestep; the step after the last one reaches abar = 1 (t = -1)."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int):
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.timesteps = strided_timesteps(len(alphas_cumprod), steps)

    def abar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def pairs(self):
        """(index, t, t_next) for every step; t_next = -1 for the final step."""
        ts = self.timesteps
        for i, t in enumerate(ts):
            yield i, t, (ts[i + 1] if i + 1 < len(ts) else -1)

    @staticmethod
    def beta_eff(abar_t: float, abar_next: float) -> float:
        """The effective beta of a strided step t -> t' (METHOD.md section 1)."""
        return 1.0 - abar_t / abar_next

    @staticmethod
    def renoise(x_next: torch.Tensor, z: torch.Tensor, abar_t: float, abar_next: float) -> torch.Tensor:
        """Time travel: go back from level t' to level t with fresh noise z."""
        ratio = abar_t / abar_next
        return math.sqrt(ratio) * x_next + math.sqrt(1.0 - ratio) * z
