"""PKD: Cao, Zhang, Gao, Cheng, Cheng, Cheng, "PKD: General Distillation Framework for Object Detectors via
Pearson Correlation Coefficient", NeurIPS 2022.

Feature imitation after normalising each channel of each map to zero mean and unit variance: the student matches
the teacher's pattern (the Pearson correlation of each channel), not its magnitude.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import NonNegative, register_method
from ..base import Context, Method
from .pairs import layer_pairs, map_shapes, width_aligner

__all__ = ["PKD", "channel_standardize", "pkd_loss"]


def channel_standardize(feature: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each channel of a (B, C, H, W) map to zero mean and unit variance over the whole batch and its positions:

        z_{b,c,h,w} = (x_{b,c,h,w} - mean_c) / (std_c + eps)

    mean_c and std_c over (B, H, W) together (not per sample), std_c the unbiased standard deviation (divided by
    B*H*W - 1), as mmrazor's ``PKDLoss.norm``."""
    channels_first = feature.transpose(0, 1).flatten(1)  # (C, B*H*W)
    mean = channels_first.mean(dim=1, keepdim=True)
    std = channels_first.std(dim=1, keepdim=True)
    standardized = (channels_first - mean) / (std + eps)
    return standardized.reshape(feature.shape[1], feature.shape[0], *feature.shape[2:]).transpose(0, 1)


def pkd_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, resize_student: bool = True) -> torch.Tensor:
    """PKD's imitation loss for one (B, C, H, W) pair of equal width, before its weight:

        L = (1 / 2) * mean_{b,c,h,w} (z(S)_{b,c,h,w} - z(T)_{b,c,h,w})^2,   z = `channel_standardize`

    For each channel this is ((n - 1) / n) * (1 - r_c) with r_c the Pearson correlation of the student's and the
    teacher's channel over its n = B*H*W values (up to eps), averaged over the channels: invariant to any
    per-channel positive scale and shift of either map.  When the spatial sizes differ, the student map is
    bilinearly resized to the teacher's (``resize_student``) or the teacher's to the student's."""
    if student_feature.shape[-2:] != teacher_feature.shape[-2:]:
        if resize_student:
            student_feature = F.interpolate(student_feature, size=teacher_feature.shape[-2:], mode="bilinear",
                                            align_corners=False)
        else:
            teacher_feature = F.interpolate(teacher_feature, size=student_feature.shape[-2:], mode="bilinear",
                                            align_corners=False)
    return F.mse_loss(channel_standardize(student_feature), channel_standardize(teacher_feature)) / 2


@register_method("pkd", description="MSE of channel-standardised maps (1 - Pearson r)",
                 layers="student stage:-1 -> teacher stage:-1 (the last encoder stage; FPN levels for detectors)",
                 family="dense",
                 paper="Cao et al. 2022, PKD: General Distillation Framework for Object Detectors via Pearson "
                       "Correlation Coefficient")
class PKD(Method):
    """PKD, as mmrazor's ``PKDLoss`` (mmrazor/models/losses/pkd_loss.py) and its configs
    (configs/distill/mmdet/pkd): `pkd_loss` on each (student, teacher) layer pair, summed, times
    ``weight``.  Each map is standardised per channel over the batch and positions together (`channel_standardize`).

    Defaults: weight 6, the base config ``pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py`` (also the
    Swin Mask R-CNN -> RetinaNet one); the RetinaNet, FCOS and RepPoints configs use 10.  There, the 4 FPN outputs
    ``neck[0..3]`` are distilled, each with that weight; with no segmentation recipe published, the default taps
    here are the last encoder stage of each model.  ``resize_student`` true as mmrazor's ``resize_stu``.
    Our reading of two points: mmrazor resizes when the heights differ; here when height or width differ.  PKD
    compares maps of the same width (FPN levels, 256 channels on both sides); where the widths differ, a learned
    1x1 conv (with bias) first brings the student map to the teacher's width -- an addition of ours, not in the
    reference.

    Options:
        weight: multiplier of each layer pair's loss (mmrazor's loss_weight; 0 turns it off)
        resize_student: when spatial sizes differ, resize the student's map to the teacher's (false: the
            teacher's to the student's); bilinear
        student_layers: student taps, paired in order with teacher_layers (e.g. several FPN levels)
        teacher_layers: teacher taps, one per student tap
    """

    reads_maps = True
    reads_teacher_logits = False
    tasks = frozenset({"segmentation", "detection", "classification"})  # a feature-map loss: any map, any task

    def __init__(self, weight: NonNegative = 6.0, resize_student: bool = True,
                 student_layers: Sequence[str] = ("stage:-1",), teacher_layers: Sequence[str] = ("stage:-1",)):
        super().__init__()
        self.weight = weight
        self.resize_student = resize_student
        self.student_taps, self.teacher_taps = layer_pairs("pkd", student_layers, teacher_layers)

    def build(self, setup) -> None:
        aligners = []
        for student_tap, teacher_tap in zip(self.student_taps, self.teacher_taps):
            student_shape, teacher_shape = map_shapes("pkd", setup, student_tap, teacher_tap)
            aligners.append(width_aligner(student_shape[1], teacher_shape[1]))
        self.aligners = nn.ModuleList(aligners)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        total = 0.0
        for index, (student_tap, teacher_tap) in enumerate(zip(self.student_taps, self.teacher_taps)):
            student = self.aligners[index](ctx.student[student_tap])
            total = total + pkd_loss(student, ctx.teacher[teacher_tap].detach(), self.resize_student)
        return {"pkd": self.weight * total}
