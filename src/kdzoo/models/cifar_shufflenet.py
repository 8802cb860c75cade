"""ShuffleNet V1 and V2 for CIFAR as in RepDistiller / mdistiller (``ShuffleV1``, ``ShuffleV2``).

Both use a 1x1 stem of 24 channels without striding or max-pool, then three stages that each halve
the resolution (32 -> 16 -> 8 -> 4).  Taps follow mdistiller: stage 0 is the stem's ReLU output,
stage i the output of ``layer<i>``; the pre-activation is the input of the final ReLU of the
stage's last unit (a separate, non-inplace ``relu_out``).

In ShuffleNetV2's unit, the untouched half of the input is already a ReLU output, so rectifying the
shuffled concatenation equals the reference's "ReLU on the branch, then concatenate and shuffle".
That lets one ReLU come last and makes the pre-activation channel-aligned with the stage output
(mdistiller's ``preact_feats`` is the same tensor before the channel shuffle).

Parameter names follow the reference code, so its checkpoints load with ``load_state_dict``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .cifar_resnet import preact_tap

SHUFFLENET_V1_PAPER = ("Zhang et al. 2018, ShuffleNet: An Extremely Efficient Convolutional Neural Network "
                       "for Mobile Devices")
SHUFFLENET_V2_PAPER = "Ma et al. 2018, ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design"
STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups: [N, g*c, H, W] -> [N, c*g, H, W]."""
    n, channels, h, w = x.shape
    return x.reshape(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


def depthwise3x3(channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


def conv1x1(in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)


class CifarShuffleNet(nn.Module):
    """What both versions share: the stem (conv1 - bn1 - relu) and taps over layer1..3 and `linear`."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv1 = conv1x1(in_channels, STEM_CHANNELS)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()  # not inplace: its input is the stem's pre-activation tap

    def publish_taps(self) -> None:
        stages = ["layer1", "layer2", "layer3"]
        self.kdzoo_taps = {
            "stages": ["relu", *stages],
            "preact": ["relu:input"] + [preact_tap(f"{name}.{len(getattr(self, name)) - 1}") for name in stages],
            "penultimate": "linear:input",
        }


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1, added to the input, or concatenated with
    its 3x3 average pool when the unit strides."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        mid_planes = out_planes // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = conv1x1(in_planes, mid_planes, first_groups)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = depthwise3x3(mid_planes, stride)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = conv1x1(mid_planes, out_planes, groups)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.relu_out = nn.ReLU()  # not inplace: its input is the unit's pre-activation tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(self.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        return self.relu_out(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class ShuffleNetV1(CifarShuffleNet):
    """Three stages of ShuffleNet units; each stage's first unit strides and concatenates its input."""

    def __init__(self, stage_channels: tuple[int, int, int] = (240, 480, 960),
                 num_units: tuple[int, int, int] = (4, 8, 4), groups: int = 3, num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__(in_channels)
        in_planes = STEM_CHANNELS
        for index, (out_planes, units) in enumerate(zip(stage_channels, num_units), 1):
            stage = []
            for unit in range(units):
                # The strided unit concatenates its pooled input, so its branch supplies the rest;
                # the very first 1x1 sees the stem's 24 channels, too few to split into groups (as in the paper).
                branch_planes = out_planes - in_planes if unit == 0 else out_planes
                first_groups = 1 if index == 1 and unit == 0 else groups
                stage.append(ShuffleV1Unit(in_planes, branch_planes, 2 if unit == 0 else 1, groups, first_groups))
                in_planes = out_planes
            self.add_module(f"layer{index}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        self.publish_taps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


class ShuffleV2Unit(nn.Module):
    """Split the channels in half; one half passes, the other goes 1x1 - depthwise 3x3 - 1x1; concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = conv1x1(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = depthwise3x3(half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = conv1x1(half, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU(inplace=True)
        self.relu_out = nn.ReLU()  # not inplace: its input is the unit's pre-activation tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passed, branch = x.chunk(2, dim=1)
        branch = self.relu(self.bn1(self.conv1(branch)))
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        # `passed` is a ReLU output, so this ReLU only rectifies the branch.
        return self.relu_out(channel_shuffle(torch.cat([passed, branch], 1), 2))


class ShuffleV2DownUnit(nn.Module):
    """Strided unit: both halves of the output come from branches over the whole input; concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        # left: depthwise 3x3 (stride 2) - 1x1
        self.conv1 = depthwise3x3(in_channels, stride=2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = conv1x1(in_channels, half)
        self.bn2 = nn.BatchNorm2d(half)
        # right: 1x1 - depthwise 3x3 (stride 2) - 1x1
        self.conv3 = conv1x1(in_channels, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.conv4 = depthwise3x3(half, stride=2)
        self.bn4 = nn.BatchNorm2d(half)
        self.conv5 = conv1x1(half, half)
        self.bn5 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(CifarShuffleNet):
    """Three stages (a strided unit then `num_units` units each), a 1x1 head conv, a linear classifier."""

    def __init__(self, stage_channels: tuple[int, int, int] = (116, 232, 464),
                 num_units: tuple[int, int, int] = (3, 7, 3), head_channels: int = 1024, num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__(in_channels)
        channels = STEM_CHANNELS
        for index, (out_channels, units) in enumerate(zip(stage_channels, num_units), 1):
            stage = [ShuffleV2DownUnit(channels, out_channels)] + [ShuffleV2Unit(out_channels) for _ in range(units)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            channels = out_channels
        self.conv2 = conv1x1(channels, head_channels)
        self.bn2 = nn.BatchNorm2d(head_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(head_channels, num_classes)
        self.publish_taps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("cifar:ShuffleV1", family="cifar-shufflenet", paper=SHUFFLENET_V1_PAPER)
def shufflenet_v1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes, in_channels=in_channels)


@register_model("cifar:ShuffleV2", family="cifar-shufflenet", paper=SHUFFLENET_V2_PAPER)
def shufflenet_v2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    return ShuffleNetV2((116, 232, 464), (3, 7, 3), head_channels=1024, num_classes=num_classes,
                        in_channels=in_channels)
