"""Helpers shared by the faceid tests (a uniquely named module: conftest names collide across plugins)."""
import torch

TINY_UNITS = [1, 1, 1, 1]
TINY_WIDTHS = [16, 16, 32, 32]


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, so a checkpoint round trip is tested on every tensor."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=gen))
