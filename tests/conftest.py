
import pytest
import torch

from zmagic_core.contracts.components import DiffusionModel, Energy
from zmagic_core.method.schedule import linear_alphas_cumprod
from zmagic_core.testing import one_thread  # noqa: F401  (autouse, for every test below tests/)


class TinyMixture(DiffusionModel):
    """A Gaussian mixture in a few dimensions: a nonlinear eps with an exact score, small enough
    for full Jacobians and Hessians."""

    def __init__(self, dim: int = 6, components: int = 4, seed: int = 0, sigma0: float = 0.3):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("mu", torch.randn(components, dim, generator=gen))
        self.register_buffer("alphas_cumprod", linear_alphas_cumprod())
        self.sigma0 = sigma0
        self.sample_shape = (dim,)

    def score(self, x, t):
        abar = self.alphas_cumprod[t].float()
        var = abar * self.sigma0**2 + 1 - abar
        d2 = (x[:, None, :] - abar.sqrt() * self.mu[None]).pow(2).sum(-1)
        r = torch.softmax(-d2 / (2 * var), dim=1)
        return (abar.sqrt() * r @ self.mu - x) / var

    def eps(self, x, t):
        return -torch.sqrt(1 - self.alphas_cumprod[t].float()) * self.score(x, t)


class QuadraticEnergy(Energy):
    """E(x0) = ||x0 - target|| (plain L2, as FreeDoM) composed with a smooth nonlinearity."""

    def __init__(self, target, power: float = 1.0):
        super().__init__()
        self.register_buffer("target", torch.as_tensor(target, dtype=torch.float32))
        self.power = power

    def forward(self, images):
        diff = torch.tanh(images) - self.target
        return (diff.pow(2).sum(1) + 1e-3).pow(self.power / 2)


@pytest.fixture
def tiny_model():
    return TinyMixture()


@pytest.fixture
def tiny_energies():
    return QuadraticEnergy([0.5, -0.2, 0.1, 0.3, -0.4, 0.2], 2.0), QuadraticEnergy([-0.3, 0.1, 0.4, -0.2, 0.2, 0.0], 1.0)

