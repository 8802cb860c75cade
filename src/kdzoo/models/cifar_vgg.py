"""VGG with BatchNorm for CIFAR (vgg8 ... vgg19), as in RepDistiller / mdistiller.

Five blocks of conv3x3-BN-ReLU (``block0`` ... ``block4``), max-pools between them, global average
pooling and one linear classifier.  On 32x32 inputs ``pool3`` is skipped, so ``block4`` works on
4x4 maps; the reference applies it on 64x64 inputs (TinyImageNet), as this does for any input
larger than 32.

Taps follow mdistiller: a stage is a block's ReLU output (before its max-pool) and its pre-activation
is the last BN output of that block.  The reference drops each block's final ReLU and applies it in
``forward``; here it is the block's last, non-inplace module, so ``"block1.<last>:input"`` is the
pre-activation without changing any parameter name (the reference's checkpoints still load).
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .cifar_resnet import init_weights

VGG_PAPER = "Simonyan & Zisserman 2015, Very Deep Convolutional Networks for Large-Scale Image Recognition"

# Conv widths of block0 ... block4 per depth.  Depths keep the original VGG names (convs + three
# fully connected layers) although these CIFAR versions have one linear classifier; vgg8 is
# RepDistiller's configuration "S".
VGG_BLOCK_WIDTHS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def conv_bn_relu_block(in_channels: int, widths: list[int]) -> nn.Sequential:
    """conv3x3(bias)-BN-ReLU per width; the last ReLU is not inplace so its input stays a usable tap."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    layers[-1] = nn.ReLU()
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG-`depth` with BatchNorm; `depth` is one of 8, 11, 13, 16, 19."""

    def __init__(self, depth: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if depth not in VGG_BLOCK_WIDTHS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_BLOCK_WIDTHS)}, got {depth}")
        block_widths = VGG_BLOCK_WIDTHS[depth]
        for index, widths in enumerate(block_widths):
            self.add_module(f"block{index}", conv_bn_relu_block(in_channels, widths))
            in_channels = widths[-1]
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        init_weights(self, linear_std=0.01)
        stages = [f"block{i}" for i in range(len(block_widths))]
        self.kdzoo_taps = {
            "stages": stages,
            "preact": [f"{name}.{len(getattr(self, name)) - 1}:input" for name in stages],
            "penultimate": "classifier:input",
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_size = x.shape[-1]
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if input_size > 32:
            x = self.pool3(x)
        x = self.pool4(self.block4(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("cifar:vgg8", family="cifar-vgg", paper=VGG_PAPER)
def vgg8(num_classes: int = 100, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(8, num_classes, in_channels)


@register_model("cifar:vgg11", family="cifar-vgg", paper=VGG_PAPER)
def vgg11(num_classes: int = 100, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(11, num_classes, in_channels)


@register_model("cifar:vgg13", family="cifar-vgg", paper=VGG_PAPER)
def vgg13(num_classes: int = 100, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(13, num_classes, in_channels)


@register_model("cifar:vgg16", family="cifar-vgg", paper=VGG_PAPER)
def vgg16(num_classes: int = 100, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(16, num_classes, in_channels)


@register_model("cifar:vgg19", family="cifar-vgg", paper=VGG_PAPER)
def vgg19(num_classes: int = 100, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(19, num_classes, in_channels)
