"""Wide ResNets for CIFAR (``wrn_<depth>_<widen>``), as in RepDistiller / mdistiller.

A pre-activation network: each block starts with BN-ReLU, so a stage's output is a raw residual sum
and its pre-activation is that sum after the next BN, before the ReLU (mdistiller's convention:
``preact_feats`` are ``block2.layer[0].bn1(f1)``, ``block3.layer[0].bn1(f2)``, ``bn1(f3)``).
Here the tap for stage i is the input of the first ReLU applied to it, which is why those ReLUs are
not inplace; for the stem (stage 0) that is ``block1.layer.0.relu1:input`` where mdistiller repeats
the stem output.

Parameter names follow the reference code (``block1.layer.0.convShortcut``), so its published
CIFAR-100 teacher checkpoints load with ``load_state_dict``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .cifar_resnet import conv3x3, init_weights

WRN_PAPER = "Zagoruyko & Komodakis 2016, Wide Residual Networks"


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the input (1x1-projected after BN-ReLU when widths differ)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()  # not inplace: its input is the previous stage's pre-activation tap
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_planes, out_planes)
        self.convShortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride, bias=False) if in_planes != out_planes else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class WideStage(nn.Module):
    """A stage of wide blocks (the reference's ``NetworkBlock``; `layer` keeps checkpoint names)."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: depth 6n+4, n blocks per stage, widths 16, 16k, 32k, 64k (k = widen)."""

    kdzoo_taps = {
        "stages": ["conv1", "block1", "block2", "block3"],
        "preact": ["block1.layer.0.relu1:input", "block2.layer.0.relu1:input", "block3.layer.0.relu1:input",
                   "relu:input"],
        "penultimate": "fc:input",
    }

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.block1 = WideStage(n, widths[0], widths[1], stride=1)
        self.block2 = WideStage(n, widths[1], widths[2], stride=2)
        self.block3 = WideStage(n, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()  # not inplace: its input is the last stage's pre-activation tap
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("cifar:wrn_16_1", family="cifar-wrn", paper=WRN_PAPER)
def wrn_16_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_channels)


@register_model("cifar:wrn_16_2", family="cifar-wrn", paper=WRN_PAPER)
def wrn_16_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_channels)


@register_model("cifar:wrn_40_1", family="cifar-wrn", paper=WRN_PAPER)
def wrn_40_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 1, num_classes, in_channels)


@register_model("cifar:wrn_40_2", family="cifar-wrn", paper=WRN_PAPER)
def wrn_40_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_channels)
