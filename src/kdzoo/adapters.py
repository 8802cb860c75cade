"""Learnable shape bridges between a student feature and a teacher feature.

They belong to the method that needs them: trained with the student, saved in checkpoints,
never exported with the student.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .taps import get_module, split_tap


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


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever of two feature maps is larger, side by side, to their common smaller size."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return resize_like(a, size), resize_like(b, size)


def feature_parameters(model: nn.Module, penultimate_tap: str) -> list[nn.Parameter]:
    """`model`'s parameters except its classifier's (the module whose input is the penultimate feature),
    as RepDistiller's ``get_feat_modules()``: what an init stage on feature losses alone trains."""
    path, is_input = split_tap(penultimate_tap)
    classifier = {id(p) for p in get_module(model, path).parameters()} if is_input else set()
    return [p for p in model.parameters() if id(p) not in classifier]


# Token <-> map bridges (cross-architecture distillation); kept apart from the CNN adapters above.
from .taps import as_feature_map, map_to_tokens, token_grid  # noqa: E402


class FeatureBridge(nn.Module):
    """A learnable bridge between features of any two architecture families: the student's feature, a map
    (B, C, H, W) or tokens (B, N, C) whose `student_prefix` leading tokens (class / distillation) are set aside,
    is viewed as a map, mapped by a `ConvAdapter` to the teacher's width and patch grid, and returned in the
    teacher's form: a map, or row-major patch tokens (B, h*w, C) when the teacher gives tokens (compare them
    with the teacher's patch tokens, e.g. `Layout.patch_tokens`).

    Shapes include the batch dimension; `teacher_grid` is the teacher's (h, w) patch grid when it gives tokens,
    `image_size` the input's (H, W) (fixes a token grid's aspect ratio).
    """

    def __init__(self, student_shape, teacher_shape, student_prefix: int = 0, teacher_prefix: int = 0,
                 image_size=None, relu: bool = False):
        super().__init__()
        self.student_prefix, self.image_size = student_prefix, image_size
        student_map = as_feature_map(torch.empty(tuple(student_shape), device="meta"), student_prefix, image_size)
        teacher_shape = tuple(teacher_shape)
        self.teacher_tokens = len(teacher_shape) == 3
        if self.teacher_tokens:
            _, grid = token_grid(teacher_shape[1], image_size, teacher_prefix)
            out_channels, out_size = teacher_shape[2], grid
        elif len(teacher_shape) == 4:
            out_channels, out_size = teacher_shape[1], teacher_shape[2:]
        else:
            raise ConfigError(f"no bridge to a teacher feature of shape {list(teacher_shape[1:])}")
        self.adapter = ConvAdapter(student_map.shape[1], out_channels, out_size, relu=relu)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        out = self.adapter(as_feature_map(feature, self.student_prefix, self.image_size))
        return map_to_tokens(out) if self.teacher_tokens else out
