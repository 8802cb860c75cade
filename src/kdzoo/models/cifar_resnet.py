"""CIFAR ResNets of the distillation literature (RepDistiller / mdistiller).

`CifarResNet` is He et al.'s three-stage CIFAR ResNet of BasicBlocks (depth 6n+2, widths 16-16-32-64);
the ``x4`` variants widen it to 32-64-128-256 as RepDistiller does.  `CifarBottleneckResNet` is
RepDistiller's "ResNet50": the four-stage ImageNet bottleneck ResNet with a 3x3 stride-1 stem and no
max-pool.

Parameter and buffer names follow the reference code, so its published CIFAR-100 teacher checkpoints
load with ``load_state_dict``.

Taps: every block ends in its own non-inplace ``relu_out`` and the stem ReLU is non-inplace too, so
``"<block>.relu_out:input"`` / ``"relu:input"`` is the pre-activation (mdistiller's ``preact_feats``).
Stage 0 is the stem's ReLU output, like mdistiller's ``feats[0]``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model

RESNET_PAPER = "He et al. 2016, Deep Residual Learning for Image Recognition"
CIFAR_WIDTHS = (16, 16, 32, 64)
CIFAR_WIDTHS_X4 = (32, 64, 128, 256)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def projection_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """The reference zoo's init: He-normal (fan-out) convs with zero bias, unit BatchNorm.

    With `linear_std`, linear layers get N(0, linear_std) weights and zero bias (VGG, MobileNetV2);
    otherwise they keep PyTorch's default.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def preact_tap(block_path: str) -> str:
    """The pre-activation of a block that ends in `relu_out`."""
    return f"{block_path}.relu_out:input"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.downsample = projection_shortcut(in_planes, planes, stride) if needs_projection else None
        self.relu_out = nn.ReLU()  # not inplace: its input is the block's pre-activation tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus the (projected) input, then ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_planes != out_planes
        self.shortcut = projection_shortcut(in_planes, out_planes, stride) if needs_projection else nn.Identity()
        self.relu_out = nn.ReLU()  # not inplace: its input is the block's pre-activation tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + self.shortcut(x))


def make_stage(block: type[BasicBlock] | type[Bottleneck], in_planes: int, planes: int, num_blocks: int,
               stride: int) -> nn.Sequential:
    """`num_blocks` blocks; the first one strides and changes the width."""
    blocks = [block(in_planes, planes, stride)]
    blocks += [block(planes * block.expansion, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def resnet_taps(stage_names: list[str], blocks_per_stage: list[int], classifier: str) -> dict:
    """Stem ReLU then each stage's output; pre-activations from the last block of each stage."""
    preact = ["relu:input"] + [preact_tap(f"{name}.{n - 1}") for name, n in zip(stage_names, blocks_per_stage)]
    return {"stages": ["relu", *stage_names], "preact": preact, "penultimate": f"{classifier}:input"}


class CifarResNet(nn.Module):
    """Three-stage CIFAR ResNet of BasicBlocks: depth 6n+2, n blocks per stage, strides 1, 2, 2.

    `widths` are the stem width followed by the three stage widths.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int] = CIFAR_WIDTHS, num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()  # not inplace: its input is the stem's pre-activation tap
        self.layer1 = make_stage(BasicBlock, widths[0], widths[1], n, stride=1)
        self.layer2 = make_stage(BasicBlock, widths[1], widths[2], n, stride=2)
        self.layer3 = make_stage(BasicBlock, widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)
        self.kdzoo_taps = resnet_taps(["layer1", "layer2", "layer3"], [n] * 3, "fc")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarBottleneckResNet(nn.Module):
    """Four-stage bottleneck ResNet (widths 64-128-256-512, x4 expansion) with a CIFAR stem."""

    def __init__(self, num_blocks: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()  # not inplace: its input is the stem's pre-activation tap
        in_planes = 64
        for index, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), 1):
            self.add_module(f"layer{index}", make_stage(Bottleneck, in_planes, planes, blocks, stride))
            in_planes = planes * Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        init_weights(self)
        self.kdzoo_taps = resnet_taps(["layer1", "layer2", "layer3", "layer4"], list(num_blocks), "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("cifar:resnet8", family="cifar-resnet", paper=RESNET_PAPER)
def resnet8(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(8, CIFAR_WIDTHS, num_classes, in_channels)


@register_model("cifar:resnet14", family="cifar-resnet", paper=RESNET_PAPER)
def resnet14(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(14, CIFAR_WIDTHS, num_classes, in_channels)


@register_model("cifar:resnet20", family="cifar-resnet", paper=RESNET_PAPER)
def resnet20(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, CIFAR_WIDTHS, num_classes, in_channels)


@register_model("cifar:resnet32", family="cifar-resnet", paper=RESNET_PAPER)
def resnet32(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, CIFAR_WIDTHS, num_classes, in_channels)


@register_model("cifar:resnet44", family="cifar-resnet", paper=RESNET_PAPER)
def resnet44(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(44, CIFAR_WIDTHS, num_classes, in_channels)


@register_model("cifar:resnet56", family="cifar-resnet", paper=RESNET_PAPER)
def resnet56(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, CIFAR_WIDTHS, num_classes, in_channels)


@register_model("cifar:resnet110", family="cifar-resnet", paper=RESNET_PAPER)
def resnet110(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(110, CIFAR_WIDTHS, num_classes, in_channels)


@register_model("cifar:resnet8x4", family="cifar-resnet", paper=RESNET_PAPER)
def resnet8x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(8, CIFAR_WIDTHS_X4, num_classes, in_channels)


@register_model("cifar:resnet32x4", family="cifar-resnet", paper=RESNET_PAPER)
def resnet32x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, CIFAR_WIDTHS_X4, num_classes, in_channels)


@register_model("cifar:ResNet50", family="cifar-resnet", paper=RESNET_PAPER)
def resnet50(num_classes: int = 100, in_channels: int = 3) -> CifarBottleneckResNet:
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes, in_channels)
