"""What the feature-map methods share: (student, teacher) layer pairs, their map shapes, and the 1x1 conv that
brings a student map to its teacher map's width."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ...errors import ConfigError
from ..base import Setup


def layer_pairs(method: str, student_layers: Sequence[str], teacher_layers: Sequence[str],
                allow_none: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The student and teacher taps as tuples, paired in order: as many of each, at least one unless
    `allow_none` (then both empty is allowed)."""
    if (not student_layers and not allow_none) or len(student_layers) != len(teacher_layers):
        least = " (both empty: the logits)" if allow_none else ", at least one"
        raise ConfigError(f"{method}: student_layers ({len(student_layers)}) and teacher_layers "
                          f"({len(teacher_layers)}) must name as many layers{least}")
    return tuple(student_layers), tuple(teacher_layers)


def map_shapes(method: str, setup: Setup, student_tap: str, teacher_tap: str,
               same_size: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (B, C, H, W) shapes of a tap pair; a one-line error naming both when either is not a map, or, with
    `same_size`, when their spatial sizes differ."""
    student_shape = tuple(setup.student_shapes[student_tap])
    teacher_shape = tuple(setup.teacher_shapes[teacher_tap])
    maps = len(student_shape) == 4 and len(teacher_shape) == 4
    if not maps or (same_size and student_shape[2:] != teacher_shape[2:]):
        raise ConfigError(f"{method}: student_layers {student_tap!r} {list(student_shape[1:])} and teacher_layers "
                          f"{teacher_tap!r} {list(teacher_shape[1:])} must be (C, H, W) maps"
                          + (" of the same spatial size" if same_size else ""))
    return student_shape, teacher_shape


def width_aligner(student_channels: int, teacher_channels: int, always: bool = False) -> nn.Module:
    """A learned 1x1 conv (with bias, no norm or activation) from the student's width to the teacher's where they
    differ (or `always`); the identity where they match."""
    if always or student_channels != teacher_channels:
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
    return nn.Identity()
