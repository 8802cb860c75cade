"""CWD: Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import resize_like
from ...errors import ConfigError
from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method
from .pairs import layer_pairs, map_shapes, width_aligner

__all__ = ["ChannelWiseDistillation", "channel_wise_divergence"]


def channel_wise_divergence(student_map: torch.Tensor, teacher_map: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """Channel-wise divergence of two (N, C, H, W) maps (any number of trailing spatial dimensions works).

    Each channel's map becomes a distribution over its H*W positions, ``p[n, c, i] = softmax_i(x[n, c, i] / tau)``,
    and the loss is the teacher -> student KL divergence of those distributions, summed over channels and
    samples, scaled by tau^2 and averaged over the N*C channel maps::

        loss = tau^2 / (N * C) * sum_{n, c} sum_i p_T[n, c, i] * (log p_T[n, c, i] - log p_S[n, c, i])

    (the paper's channel distribution loss; mmrazor's ``ChannelWiseDivergence`` computes this KL.  The authors'
    mm*-distiller code sums only the cross-entropy ``-p_T log p_S``, which differs by the teacher's entropy, a
    constant with the same gradient.)  No gradient reaches the teacher map.
    """
    if student_map.shape != teacher_map.shape or student_map.dim() < 3:
        raise ConfigError(f"cwd: the student map {list(student_map.shape)} and the teacher map "
                          f"{list(teacher_map.shape)} must have the same (N, C, H, W) shape")
    batch, channels = student_map.shape[:2]
    student_log_probs = F.log_softmax(student_map.flatten(2) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_map.detach().flatten(2) / temperature, dim=-1)
    divergence = F.kl_div(student_log_probs, teacher_log_probs, reduction="sum", log_target=True)
    return divergence * temperature ** 2 / (batch * channels)


@register_method("cwd", description="KL of each channel's spatial softmax (maps)",
                 layers="logits:0 -> logits:0 (segmentation: the raw class maps); fpn:0.. (detection recipes)",
                 family="dense", paper="Shu et al. 2021, Channel-wise Knowledge Distillation for Dense Prediction")
class ChannelWiseDistillation(Method):
    """Channel-wise distillation: every channel of a map is softened into a distribution over positions and the
    student's matches the teacher's by KL (`channel_wise_divergence`), summed over the (student, teacher) layer
    pairs, each pair at ``weight`` (mmrazor gives every FPN level the same ``loss_weight``).

    Where: by default the classifiers' raw outputs at the feature resolution, before they are upsampled to the
    image (``logits:0``), as both references distil ``decode_head.conv_seg``'s output (mmrazor's and the authors'
    PSPNet configs; TorchDistiller's ``preds_S[0]``, the head output at 1/8).  On detectors the references distil
    the FPN levels (``student_layers: [fpn:0, fpn:1, fpn:2]``, the same for the teacher).  ``student_layers`` /
    ``teacher_layers`` may name any other taps (e.g. ``decoder:0``, ``stage:-1``); both empty distil the logits
    at the image size (``ctx.student_logits``).

    Adapter: when the two maps' widths differ the student map passes a learned 1x1 conv (with bias, no BN or
    ReLU, so negative activations keep their place in the softmax) to the teacher's width: the authors'
    mmsegmentation-/mmdetection-distiller ``ChannelWiseDivergence.align``.  With equal widths there is none
    (mmrazor never has one).  When the spatial sizes differ, which both references refuse (they assert equal
    sizes), the student map is resized to the teacher's (average-pooled down, bilinear up), so the teacher's
    distributions stay as the teacher computed them.

    Defaults: temperature 4 and weight 3 are the authors' PSPNet-R101 -> R18 Cityscapes logits recipe
    (TorchDistiller/SemSeg-distill README: ``exp_cwd.sh channel kl 3 4`` = weight 3, tau 4), with the usual
    cross-entropy at weight 1.  mmrazor's and the authors' mmsegmentation-distiller configs of the same pair use
    tau 1, weight 5 (ADE20K: tau 1, weight 10); their detection recipes distil the FPN levels with tau 1,
    weight 10 each (mmrazor RetinaNet / Faster R-CNN; the authors' RetinaNet config: weight 5) or GFL's
    classification-head logits with tau 1, weight 5 (mmrazor v0.3).  The paper's extra GAN and pixel-wise terms
    (TorchDistiller ``--adv`` / ``--kd``) are not part of this method.

    Options:
        weight: multiplier of each layer pair's loss (0 turns it off)
        temperature: softmax temperature tau over each channel's positions (the loss is scaled by tau^2)
        student_layers: student taps distilled, paired in order with teacher_layers (empty: the upsampled logits)
        teacher_layers: teacher taps, one per student tap (empty with student_layers empty)
    """

    ce_weight = 1.0
    reads_maps = True
    tasks = frozenset({"segmentation", "detection"})

    def __init__(self, weight: NonNegative = 3.0, temperature: Positive = 4.0,
                 student_layers: Sequence[str] = ("logits:0",), teacher_layers: Sequence[str] = ("logits:0",)):
        super().__init__()
        self.weight = weight
        self.temperature = temperature
        self.student_taps, self.teacher_taps = layer_pairs("cwd", student_layers, teacher_layers, allow_none=True)
        # on taps, the teacher's upsampled logits are not read (its forward may stop at the tapped layer)
        self.reads_teacher_logits = not self.teacher_taps
        self.aligners = nn.ModuleList()  # `build` adds one per pair: a 1x1 conv where the widths differ

    def build(self, setup) -> None:
        shapes = [map_shapes("cwd", setup, student_tap, teacher_tap)
                  for student_tap, teacher_tap in zip(self.student_taps, self.teacher_taps)]
        self.aligners = nn.ModuleList(width_aligner(student[1], teacher[1]) for student, teacher in shapes)

    def maps(self, ctx: Context) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (student, teacher) map pairs compared, each student map aligned to its teacher map's width and size."""
        if not self.student_taps:
            return [(ctx.student_logits, ctx.teacher_logits)]
        pairs = []
        for align, student_tap, teacher_tap in zip(self.aligners, self.student_taps, self.teacher_taps):
            teacher_map = ctx.teacher[teacher_tap]
            pairs.append((resize_like(align(ctx.student[student_tap]), teacher_map.shape[-2:]), teacher_map))
        return pairs

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        total = sum(channel_wise_divergence(student_map, teacher_map, self.temperature)
                    for student_map, teacher_map in self.maps(ctx))
        return {"cwd": self.weight * total}
