"""The shapes world (SHAPES.md): a Gaussian mixture over rendered shapes, with an exact score.

p(x0) = sum_k w_k N(x0; mu_k, sigma0^2 I).  Under the VP forward process every marginal is again
a mixture, so the score, the Tweedie estimate and every attribute posterior are closed-form.
Reweighting the prototypes (``log_weights``) gives the exact conditional model, the oracle.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from zmagic_core.contracts.components import DiffusionModel
from zmagic_core.method.schedule import linear_alphas_cumprod

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right",
             "bottom-left", "bottom", "bottom-right")
BACKGROUND = (0.0, 0.0, 0.0)  # mid grey: every color is equally far from it
ATTRIBUTES = ("shape", "color", "position")


def _shape_coverage(shape: str, size: int, cell: int, supersample: int = 4) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of one shape in grid cell ``cell`` (row-major, 3 x 3)."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float64) + 0.5) / supersample
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cell_px = size / 3
    cy, cx = (cell // 3 + 0.5) * cell_px, (cell % 3 + 0.5) * cell_px
    dy, dx = (yy - cy) / cell_px, (xx - cx) / cell_px  # in cell units
    if shape == "circle":
        inside = dx**2 + dy**2 <= 0.36**2
    elif shape == "square":
        inside = (dx.abs() <= 0.32) & (dy.abs() <= 0.32)
    elif shape == "triangle":  # apex up, base at dy = +0.3
        inside = (dy <= 0.3) & (dy >= -0.4) & (dx.abs() <= (dy + 0.4) * 0.55)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.double().view(size, supersample, size, supersample).mean(dim=(1, 3))


def render(shape: str, color: str, position: str, size: int = 32) -> torch.Tensor:
    """One prototype image (3, size, size) in [-1, 1]."""
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {tuple(COLORS)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {POSITIONS}")
    cover = _shape_coverage(shape, size, POSITIONS.index(position))
    bg = torch.tensor(BACKGROUND, dtype=torch.float64).view(3, 1, 1)
    fg = torch.tensor(COLORS[color], dtype=torch.float64).view(3, 1, 1)
    return (bg * (1 - cover) + fg * cover).float()


@dataclass(frozen=True)
class Prototype:
    shape: str
    color: str
    position: str

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "position": self.position}


def per_sample_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b computed one row of ``a`` at a time.

    A batched matrix product may pick another kernel (another summation order) for another number
    of rows, so a sample's bits would depend on its batch; one row at a time they never do."""
    if a.shape[0] == 1:
        return a @ b
    return torch.cat([row @ b for row in a.split(1)])


class ShapesModel(DiffusionModel):
    """The exact eps(x_t, t) of the shapes mixture, with the same interface as a diffusers UNet."""

    def __init__(self, size: int = 32, sigma0: float = 0.1, shapes=SHAPES, colors=tuple(COLORS),
                 positions=POSITIONS, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, log_weights: torch.Tensor | None = None):
        super().__init__()
        self.size, self.sigma0 = size, sigma0
        self.prototypes = [Prototype(*p) for p in itertools.product(shapes, colors, positions)]
        mu = torch.stack([render(p.shape, p.color, p.position, size) for p in self.prototypes])
        self.register_buffer("mu", mu.flatten(1))  # (K, D)
        self.register_buffer("mu_sq", self.mu.pow(2).sum(1))
        self.register_buffer("alphas_cumprod", linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end))
        lw = torch.zeros(len(self.prototypes)) if log_weights is None else log_weights.float()
        self.register_buffer("log_weights", lw - torch.logsumexp(lw, 0))
        self.sample_shape = (3, size, size)

    @property
    def dim(self) -> int:
        return self.mu.shape[1]

    def conditioned(self, log_weights: torch.Tensor) -> "ShapesModel":
        """The exact conditional model: the same prototypes reweighted by p(c | k)."""
        other = ShapesModel.__new__(ShapesModel)
        DiffusionModel.__init__(other)
        other.size, other.sigma0, other.prototypes, other.sample_shape = (
            self.size, self.sigma0, self.prototypes, self.sample_shape)
        for name in ("mu", "mu_sq", "alphas_cumprod"):
            other.register_buffer(name, getattr(self, name))
        lw = log_weights.to(self.mu).float()
        other.register_buffer("log_weights", (self.log_weights + lw) - torch.logsumexp(self.log_weights + lw, 0))
        return other

    def _abar(self, t) -> torch.Tensor:
        return self.alphas_cumprod[int(t)].to(self.mu.dtype)

    def _logits(self, x: torch.Tensor, abar: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * abar.sqrt() * per_sample_matmul(flat, self.mu.T) + abar * self.mu_sq
        return -d2 / (2 * var) + self.log_weights

    def variance(self, abar: torch.Tensor) -> torch.Tensor:
        return abar * self.sigma0**2 + 1 - abar

    def responsibilities(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """r_k(x_t) = p(k | x_t), shape (B, K)."""
        abar = self._abar(t)
        return torch.softmax(self._logits(x_t, abar, self.variance(abar)), dim=1)

    def score(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        abar = self._abar(t)
        var = self.variance(abar)
        r = torch.softmax(self._logits(x_t, abar, var), dim=1)
        return ((abar.sqrt() * per_sample_matmul(r, self.mu) - x_t.flatten(1)) / var).view_as(x_t)

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        return -torch.sqrt(1 - self._abar(t)) * self.score(x_t, t)

    def log_density(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """log p_t(x_t) per sample, exactly."""
        abar = self._abar(t)
        var = self.variance(abar)
        return torch.logsumexp(self._logits(x_t, abar, var), dim=1) - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def prototype_index(self, shape: str, color: str, position: str) -> int:
        try:
            return self.prototypes.index(Prototype(shape, color, position))
        except ValueError:
            raise ValueError(f"no prototype ({shape}, {color}, {position}) in this world") from None

    def attribute_mask(self, attribute: str, value: str) -> torch.Tensor:
        """Boolean (K,) mask of the prototypes that have ``attribute == value``."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
        values = [getattr(p, attribute) for p in self.prototypes]
        if value not in values:
            raise ValueError(f"unknown {attribute} {value!r}; expected one of {sorted(set(values))}")
        return torch.tensor([v == value for v in values], device=self.mu.device)
