"""ArcFace IR-SE backbone in the layout of TreB1eN/InsightFace_Pytorch (``Backbone(50, 0.6, 'ir_se')``).

This is the network behind ``model_ir_se50.pth``, the checkpoint FreeDoM, pSp/e4e and the Z-Magic
paper use for face identity.  Module names and order are kept exactly, so that checkpoint loads
with ``strict=True``:

- ``input_layer``: Conv2d(3, 64, 3, 1, 1, bias=False), BatchNorm2d(64), PReLU(64)
- ``body.<i>``: one ``BottleneckIRSE`` per unit; 3 + 4 + 14 + 3 units for 50 layers, each stage's
  first unit with stride 2.  A unit has ``shortcut_layer`` (MaxPool2d(1, stride) when the depth is
  unchanged, else Conv2d 1x1 + BatchNorm2d) and ``res_layer`` = BatchNorm2d, Conv2d 3x3, PReLU,
  Conv2d 3x3 (stride), BatchNorm2d, SEModule(fc1, fc2 as 1x1 convolutions, reduction 16).
- ``output_layer``: BatchNorm2d(512), Dropout, Flatten, Linear(512 * 7 * 7, 512), BatchNorm1d(512)

Input: (N, 3, 112, 112) RGB in [-1, 1].  Output: L2-normalised (N, 512) embeddings.
The unit counts and widths are parameters so tests can build a tiny model of the same layout.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

IR_SE50_UNITS = (3, 4, 14, 3)
IR_SE50_WIDTHS = (64, 128, 256, 512)
INPUT_SIZE = 112


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gates from the global average, via two 1x1 convolutions."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * w


class BottleneckIRSE(nn.Module):
    """One improved-residual unit with squeeze-and-excitation (``bottleneck_IR_SE``)."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def unit_plan(units: Sequence[int], widths: Sequence[int]) -> list[tuple[int, int, int]]:
    """(in_channel, depth, stride) per unit: each stage starts with a stride-2 unit."""
    plan, in_channel = [], widths[0]
    for count, depth in zip(units, widths):
        plan.append((in_channel, depth, 2))
        plan += [(depth, depth, 1)] * (count - 1)
        in_channel = depth
    return plan


class IRSEBackbone(nn.Module):
    """ArcFace IR-SE embedding network; ``IRSEBackbone()`` is IR-SE50 as in ``model_ir_se50.pth``."""

    def __init__(self, units: Sequence[int] = IR_SE50_UNITS, widths: Sequence[int] = IR_SE50_WIDTHS,
                 embedding_size: int = 512, drop_ratio: float = 0.6, input_size: int = INPUT_SIZE):
        super().__init__()
        if len(units) != len(widths) or min(units) < 1:
            raise ValueError("units and widths need one entry per stage, each stage at least one unit")
        self.input_size = input_size
        final = input_size // 2 ** len(units)
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, widths[0], (3, 3), 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        self.body = nn.Sequential(*[BottleneckIRSE(*u) for u in unit_plan(units, widths)])
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(widths[-1]),
            nn.Dropout(drop_ratio),
            Flatten(),
            nn.Linear(widths[-1] * final * final, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return x / x.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)


def ir_se50() -> IRSEBackbone:
    return IRSEBackbone(IR_SE50_UNITS, IR_SE50_WIDTHS)
