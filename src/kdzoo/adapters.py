"""Learnable shape bridges between a student feature and a teacher feature.

They belong to the method that needs them: trained with the student, saved in checkpoints,
never exported with the student.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


def resize_like(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool down or bilinearly upsample a feature map to `size`."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvAdapter(nn.Module):
    """1x1 conv + BatchNorm (+ ReLU) to the teacher's width, then resize to its spatial size."""

    def __init__(self, in_channels: int, out_channels: int, out_size: tuple[int, int], relu: bool = True):
        super().__init__()
        self.out_size = tuple(out_size)
        layers = [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_like(self.body(x), self.out_size)


def make_adapter(student_shape: torch.Size, teacher_shape: torch.Size, relu: bool = True) -> nn.Module:
    """The simplest learnable map from a student feature shape to a teacher feature shape.

    Shapes include the batch dimension: (B, C, H, W) feature maps or (B, D) vectors.
    """
    s, t = tuple(student_shape[1:]), tuple(teacher_shape[1:])
    if len(s) == 3 and len(t) == 3:
        return ConvAdapter(s[0], t[0], t[1:], relu=relu)
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0])
    raise ConfigError(f"no adapter from student feature {list(s)} to teacher feature {list(t)}")
