"""MGD: Yang, Li, Shao, Shi, Yuan, Yuan, "Masked Generative Distillation", ECCV 2022.

The student's feature map, brought to the teacher's width by a 1x1 conv, has random positions zeroed; a small
generation block (conv3x3 - ReLU - conv3x3) must rebuild the teacher's *whole* feature map from what is left.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...registry import NonNegative, UnitInterval, register_method
from ..base import Context, Method
from .pairs import layer_pairs, map_shapes, width_aligner

__all__ = ["MGD", "generation_block", "keep_mask_shape", "mgd_loss", "random_keep_mask"]


def keep_mask_shape(feature_shape, mask_on_channel: bool = False) -> tuple[int, int, int, int]:
    """The shape of the mask for a (B, C, H, W) feature: (B, 1, H, W), one draw per position and sample, shared by
    the channels (detection and segmentation); (B, C, 1, 1), one draw per channel and sample (the authors'
    classification code and mmrazor's ``mask_on_channel``)."""
    batch, channels, height, width = tuple(feature_shape)
    return (batch, channels, 1, 1) if mask_on_channel else (batch, 1, height, width)


def random_keep_mask(shape, mask_ratio: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """A 0/1 mask of `shape` whose entries are 0 (masked) with probability `mask_ratio`, independently.

    Drawn with torch's global RNG (``torch.rand`` on `device`), so a seeded run draws the same masks.  As the
    authors: u ~ U[0, 1), masked where u > 1 - mask_ratio."""
    uniform = torch.rand(shape, device=device)
    return (uniform <= 1 - mask_ratio).to(dtype)


def generation_block(channels: int) -> nn.Sequential:
    """The authors' generation block on the teacher's width: conv3x3 - ReLU - conv3x3, padding 1, with biases."""
    return nn.Sequential(nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, kernel_size=3, padding=1))


def mgd_loss(aligned_student: torch.Tensor, teacher_feature: torch.Tensor, keep_mask: torch.Tensor,
             generator: nn.Module) -> torch.Tensor:
    """MGD's generation loss (the paper's L_dis) for one layer, before its weight alpha:

        L = (1 / B) * sum_{b, c, h, w} (G(S * M)_{b,c,h,w} - T_{b,c,h,w})^2

    S the student feature already at the teacher's width (B, C, H, W), M `keep_mask` (0 where masked,
    broadcast over S), G the generation block, T the teacher feature.  A sum of squares over every element
    divided by the batch size only (``MSELoss(reduction='sum') / N`` in the authors' code), so it grows with the
    map's size; the published alpha values are tuned to that."""
    generated = generator(aligned_student * keep_mask)
    return (generated - teacher_feature).pow(2).sum() / teacher_feature.shape[0]


@register_method("mgd", description="rebuild the teacher map from a masked student map",
                 layers="student stage:-1 -> teacher stage:-1 (the last encoder stage, as the authors' segmenters)",
                 family="dense",
                 paper="Yang et al. 2022, Masked Generative Distillation")
class MGD(Method):
    """Masked Generative Distillation, as the authors' ``FeatureLoss`` (github.com/yzd-v/MGD, ``seg/`` and
    ``det/`` ``mmdet/distillation/losses/mgd.py``) and mmrazor's ``MGDConnector`` + ``MGDLoss``.

    For each (student, teacher) layer pair: a 1x1 conv (with bias, no BN) to the teacher's width when the widths
    differ (none when equal), a random keep mask (`random_keep_mask`, drawn in ``forward`` from torch's global
    RNG: each position of each sample masked with probability ``mask_ratio``), a `generation_block` of its own,
    and `mgd_loss`; the layers' terms are summed, each times ``weight``.  The maps must have the same spatial size
    (the authors assert it).

    Defaults are the authors' segmentation recipe (``seg/configs/distillers/mgd/psp_r101_distill_*_city.py``):
    alpha_mgd = 2e-5, lambda_mgd = 0.75, on the last backbone stage (``student_feat[-1]``, ``fea_t[-1]`` in their
    SegmentationDistiller).  Their other recipes: detection on every FPN level (``neck.fpn_convs.{0..4}.conv``;
    RetinaNet, RepPoints, SOLO alpha 2e-5 / lambda 0.65; Faster and Mask R-CNN alpha 5e-7 / lambda 0.45 on
    levels 0-3); classification on the last stage with channel masks (``mask_on_channel: true``), alpha 7e-5,
    lambda 0.15.  Not implemented here: the logit term the authors' segmentation configs add (``use_logit``:
    channel-wise distribution distillation of the logits, tau 4, weight 3); pair ``mgd`` with a channel-wise
    logit method for the full segmentation recipe.

    Options:
        weight: multiplier of each layer's loss (the authors' alpha_mgd; 0 turns it off)
        mask_ratio: probability that a position (or a channel) of the student's map is masked (lambda_mgd)
        mask_on_channel: mask whole channels per sample instead of positions (the authors' classification code)
        student_layers: student taps, paired in order with teacher_layers (e.g. several FPN levels)
        teacher_layers: teacher taps the generated maps must match, one per student tap
    """

    reads_maps = True
    reads_teacher_logits = False
    tasks = frozenset({"segmentation", "detection", "classification"})  # a feature-map loss: any map, any task

    def __init__(self, weight: NonNegative = 2e-5, mask_ratio: UnitInterval = 0.75, mask_on_channel: bool = False,
                 student_layers: Sequence[str] = ("stage:-1",), teacher_layers: Sequence[str] = ("stage:-1",)):
        super().__init__()
        self.weight = weight
        self.mask_ratio = mask_ratio
        self.mask_on_channel = mask_on_channel
        self.student_taps, self.teacher_taps = layer_pairs("mgd", student_layers, teacher_layers)

    def build(self, setup) -> None:
        aligners, generators = [], []
        for student_tap, teacher_tap in zip(self.student_taps, self.teacher_taps):
            student_shape, teacher_shape = map_shapes("mgd", setup, student_tap, teacher_tap, same_size=True)
            student_channels, teacher_channels = student_shape[1], teacher_shape[1]
            aligners.append(width_aligner(student_channels, teacher_channels))
            generators.append(generation_block(teacher_channels))
        self.aligners = nn.ModuleList(aligners)
        self.generators = nn.ModuleList(generators)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        total = 0.0
        for index, (student_tap, teacher_tap) in enumerate(zip(self.student_taps, self.teacher_taps)):
            aligned = self.aligners[index](ctx.student[student_tap])
            teacher = ctx.teacher[teacher_tap].detach()
            keep = random_keep_mask(keep_mask_shape(aligned.shape, self.mask_on_channel), self.mask_ratio,
                                    device=aligned.device, dtype=aligned.dtype)
            total = total + mgd_loss(aligned, teacher, keep, self.generators[index])
        return {"mgd": self.weight * total}
