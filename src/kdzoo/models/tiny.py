"""Tiny CNNs for the embedded demo and fast tests (seconds on a CPU)."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import PositiveInt, register_model


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@register_model("tiny:cnn", family="tiny", paper="kdzoo demo network")
class TinyCNN(nn.Module):
    """Three conv stages (width w, 2w, 4w; the last two stride 2), global pool, linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: PositiveInt = 16):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width)
        self.stage1 = conv_bn_relu(width, width)
        self.stage2 = conv_bn_relu(width, 2 * width, stride=2)
        self.stage3 = conv_bn_relu(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
