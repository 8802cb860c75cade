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


class ConvReg(nn.Module):
    """RepDistiller's / mdistiller's convolutional regressor from a student map (C_s, H_s, W_s) to a teacher
    map (C_t, H_t, W_t), its layer chosen from the two sizes:

    - H_s == 2 H_t: a 3x3 conv, stride 2, padding 1;
    - 2 H_s == H_t: a 4x4 transposed conv, stride 2, padding 1;
    - H_s >= H_t: a (1 + H_s - H_t) x (1 + W_s - W_t) conv, stride 1 (1x1 when the sizes are equal);

    then BatchNorm and, with `relu`, a ReLU (FitNet's hint regressor; AB's connectors have none).  The convs
    keep their bias, as the references'.  A student map smaller than the teacher's, other than exactly half,
    has no such layer and is refused.
    """

    def __init__(self, student_shape, teacher_shape, relu: bool = True):
        super().__init__()
        student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
        if len(student_shape) != 4 or len(teacher_shape) != 4:
            raise ConfigError(f"ConvReg maps (B, C, H, W) feature maps, got student {list(student_shape)} and "
                              f"teacher {list(teacher_shape)}")
        _, s_c, s_h, s_w = student_shape
        _, t_c, t_h, t_w = teacher_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ConfigError(f"ConvReg: no regressor from a student map {list(student_shape[1:])} to a larger "
                              f"teacher map {list(teacher_shape[1:])} (only exactly twice the size is upsampled)")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def convreg_fits(student_shape, teacher_shape) -> bool:
    """Whether `ConvReg` has a layer for these (B, C, H, W) shapes (the references raise otherwise)."""
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        return False
    (s_h, s_w), (t_h, t_w) = tuple(student_shape[2:]), tuple(teacher_shape[2:])
    return s_h == 2 * t_h or 2 * s_h == t_h or (s_h >= t_h and s_w >= t_w)


def regressor(student_shape, teacher_shape, relu: bool = True) -> nn.Module:
    """`ConvReg` wherever the references define it; beyond that (a student map smaller than the teacher's by
    other than exactly half, or vectors) the simplest bridge, `make_adapter` (1x1 conv + BN, resized)."""
    if convreg_fits(student_shape, teacher_shape):
        return ConvReg(student_shape, teacher_shape, relu=relu)
    return make_adapter(student_shape, teacher_shape, relu=relu)


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
