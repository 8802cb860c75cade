"""MobileNetV2 for CIFAR as in RepDistiller / mdistiller (``mobile_half``: expansion 6, width 0.5).

The reference keeps ImageNet's strides (stride-2 stem, 32x32 -> 2x2) and a 1280-wide 1x1 head.

Taps follow mdistiller's ``feats``: the stem output, then the outputs of inverted-residual groups
1, 2, 4 and 6 (the ends of the 16x16, 8x8, 4x4 and 2x2 resolutions).  Those group outputs end in
a linear bottleneck (BN, no ReLU), so they are their own pre-activation and the ``preact`` list
repeats them; only the stem has a ReLU after it, whose input is its pre-activation.
(mdistiller publishes no ``preact_feats`` for this network.)

Parameter names follow the reference code, so its checkpoints load with ``load_state_dict``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .cifar_resnet import init_weights

MOBILENETV2_PAPER = "Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks"

# (expands, output channels, blocks, first stride) per group of inverted residuals; the first
# group does not expand, the others expand by the network's `expand_ratio`.
INVERTED_RESIDUAL_GROUPS = [
    (False, 16, 1, 1),
    (True, 24, 2, 1),
    (True, 32, 3, 2),
    (True, 64, 4, 2),
    (True, 96, 3, 1),
    (True, 160, 3, 2),
    (True, 320, 1, 1),
]
STAGE_GROUPS = (1, 2, 4, 6)  # groups whose outputs are mdistiller's feats[1:]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 inplace: bool = True) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=inplace))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, depthwise 3x3-BN-ReLU, 1x1 project-BN (linear); residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(  # one flat Sequential: the reference's parameter names conv.0 ... conv.7
            *conv_bn_relu(in_channels, hidden, 1),
            *conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 with channel counts scaled by `width_mult` and hidden layers `expand_ratio` wide."""

    kdzoo_taps = {
        "stages": ["conv1", *(f"blocks.{i}" for i in STAGE_GROUPS)],
        "preact": ["conv1.2:input", *(f"blocks.{i}" for i in STAGE_GROUPS)],
        "penultimate": "classifier:input",
    }

    def __init__(self, expand_ratio: int = 6, width_mult: float = 0.5, num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_channels, channels, 3, stride=2, inplace=False)  # its ReLU input is a tap
        self.blocks = nn.ModuleList()
        for expands, width, num_blocks, stride in INVERTED_RESIDUAL_GROUPS:
            out_channels = int(width * width_mult)
            group = []
            for block_stride in [stride] + [1] * (num_blocks - 1):
                group.append(InvertedResidual(channels, out_channels, block_stride, expand_ratio if expands else 1))
                channels = out_channels
            self.blocks.append(nn.Sequential(*group))
        head_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280  # never narrower than 1280
        self.conv2 = conv_bn_relu(channels, head_channels, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(head_channels, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.avgpool(self.conv2(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("cifar:mobile_half", family="cifar-mobilenetv2", paper=MOBILENETV2_PAPER)
def mobile_half(num_classes: int = 100, in_channels: int = 3) -> CifarMobileNetV2:
    return CifarMobileNetV2(6, 0.5, num_classes, in_channels)
