"""ConvNet-3, the standard network of dataset distillation (DC, DSA, DM, MTT, DataDAM, FTD).

``depth`` blocks of [3x3 conv (``width`` channels) -> norm -> ReLU -> 2x2 average pool], then one linear
classifier over the flattened feature map.  ``"instancenorm"`` is ``GroupNorm(width, width)`` as in the
reference code (VICO-UoE/DatasetCondensation): per-sample, per-channel statistics with a learnable
affine, so a batch of one synthetic image trains the same as any other batch.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import PositiveInt, register_model

CONVNET_PAPER = "Zhao, Mopuri & Bilen 2021, Dataset Condensation with Gradient Matching (ConvNet-3)"
NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
# ReLU in place, as the authors' networks.py: a pass over the real images without a graph then allocates one
# activation-sized tensor less per block (on a CPU the fresh pages of those allocations cost as much as the op)
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "leakyrelu": lambda: nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid}
POOLINGS = {"avgpooling": lambda: nn.AvgPool2d(2, 2), "maxpooling": lambda: nn.MaxPool2d(2, 2), "none": nn.Identity}


def norm_layer(norm: str, channels: int, height: int, width: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.LayerNorm([channels, height, width])
    if norm == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str, act: str, pooling: str, height: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = norm_layer(norm, cout, height, width)
        self.act = ACTIVATIONS[act]()
        self.pool = POOLINGS[pooling]()


@register_model("convnet:convnet3", family="convnet", paper=CONVNET_PAPER)
class ConvNet(nn.Module):
    """ConvNet-D with width W: the default (3, 128, instance norm, ReLU, avg-pool) is ConvNet-3."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: PositiveInt = 128, depth: PositiveInt = 3,
                 norm: str = "instancenorm", act: str = "relu", pooling: str = "avgpooling",
                 image_size: int | tuple[int, int] = 32):
        super().__init__()
        for name, value, allowed in (("norm", norm, NORMS), ("act", act, tuple(ACTIVATIONS)),
                                     ("pooling", pooling, tuple(POOLINGS))):
            if value not in allowed:
                raise ConfigError(f"convnet: unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        height, wide = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        blocks, channels = [], in_channels
        for _ in range(depth):
            blocks.append(ConvBlock(channels, width, norm, act, pooling, height, wide))
            channels = width
            if pooling != "none":
                height, wide = height // 2, wide // 2
        if height < 1 or wide < 1:
            raise ConfigError(f"convnet: {depth} pooled blocks shrink a {image_size} image to nothing; use a smaller depth")
        self.depth = depth
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width * height * wide, num_classes)

    @property
    def kdzoo_taps(self) -> dict[str, list[str] | str]:
        # "act": each block's activation before pooling (the maps attention matching compares).
        return {"stages": [f"features.{i}" for i in range(self.depth)], "penultimate": "classifier:input",
                "act": [f"features.{i}.act" for i in range(self.depth)]}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened feature map that enters the classifier."""
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
