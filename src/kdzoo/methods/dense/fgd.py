"""FGD: Yang, Li, Jiang, Wang, Li, Yuan, Yuan, "Focal and Global Knowledge Distillation for Detectors", CVPR 2022.

On each FPN level the student's feature map learns the teacher's in two ways.  *Focal*: the squared error is
split into foreground (inside ground-truth boxes, each box's cells weighted by one over its area) and background
(the rest, normalised by its count), both weighted by the teacher's spatial and channel attention, and the
student's attention maps must match the teacher's (L1).  *Global*: both maps pass a GcBlock (global context
modelling) of their own and the results must match (squared error).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method
from .pairs import layer_pairs, map_shapes, width_aligner

__all__ = ["FGD", "GlobalContextBlock", "attention_loss", "attention_maps", "box_masks", "focal_loss",
           "global_loss"]


def box_masks(boxes_per_image: Sequence[torch.Tensor], feature_size: tuple[int, int],
              input_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground and background masks of one FPN level, each (B, H, W), from xyxy boxes in input pixels.

    A box (x1, y1, x2, y2) is scaled to the level, x by W / input width and y by H / input height, and covers
    the cells ``floor(x1') .. ceil(x2')`` and ``floor(y1') .. ceil(y2')``, both ends included, as the authors'
    slices ``[hmin:hmax + 1, wmin:wmax + 1]`` (so a box covering exactly one cell marks the 2 x 2 block from
    that cell).  Inside its cells a box has the value 1 / ((hmax + 1 - hmin) (wmax + 1 - wmin)), its area in
    cells as the authors count it (before clipping to the map); where boxes overlap the larger value (the
    smaller box) wins.  The background mask is 1 where no box is, divided by the number of such cells (all zero
    when boxes cover the whole map).  Cells past the map's edge are dropped."""
    height, width = feature_size
    input_height, input_width = input_size
    foreground, background = [], []
    for boxes in boxes_per_image:
        boxes = boxes.reshape(-1, 4).float()
        rows = torch.arange(height, device=boxes.device)
        cols = torch.arange(width, device=boxes.device)
        col_min = torch.floor(boxes[:, 0] / input_width * width).long()
        col_max = torch.ceil(boxes[:, 2] / input_width * width).long()
        row_min = torch.floor(boxes[:, 1] / input_height * height).long()
        row_max = torch.ceil(boxes[:, 3] / input_height * height).long()
        area = 1.0 / ((row_max + 1 - row_min) * (col_max + 1 - col_min)).float()
        in_rows = (rows[None, :] >= row_min[:, None]) & (rows[None, :] <= row_max[:, None])  # (n, H)
        in_cols = (cols[None, :] >= col_min[:, None]) & (cols[None, :] <= col_max[:, None])  # (n, W)
        inside = in_rows[:, :, None] & in_cols[:, None, :]  # (n, H, W)
        weighted = torch.where(inside, area[:, None, None], torch.zeros((), device=boxes.device))
        image_foreground = weighted.amax(0) if len(boxes) else torch.zeros(height, width, device=boxes.device)
        image_background = (image_foreground == 0).float()
        image_background = image_background / image_background.sum().clamp(min=1)
        foreground.append(image_foreground)
        background.append(image_background)
    return torch.stack(foreground), torch.stack(background)


def attention_maps(feature: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FGD's spatial and channel attention of a (B, C, H, W) map (paper eq. 2-3):

        A_S[b, h, w] = H W softmax_{(h, w)}(mean_c |F[b, c, h, w]| / T)        shape (B, H, W)
        A_C[b, c]    = C   softmax_c(mean_{h, w} |F[b, c, h, w]| / T)          shape (B, C)

    each scaled so that it averages 1 over its positions (channels)."""
    batch, channels, height, width = feature.shape
    magnitude = feature.abs()
    spatial = F.softmax(magnitude.mean(1).reshape(batch, -1) / temperature, dim=1)
    channel = F.softmax(magnitude.mean((2, 3)) / temperature, dim=1)
    return (height * width * spatial).reshape(batch, height, width), channels * channel


def focal_loss(student: torch.Tensor, teacher: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor],
               teacher_attention: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground and background feature losses (paper eq. 5, before alpha and beta), (B, C, H, W) maps of
    the same shape, the student's already at the teacher's width:

        L_fg = (1 / B) sum_{b,c,h,w} M[b,h,w] A_S^T[b,h,w] A_C^T[b,c] (T - S)[b,c,h,w]^2
        L_bg = (1 / B) sum_{b,c,h,w} N[b,h,w] A_S^T[b,h,w] A_C^T[b,c] (T - S)[b,c,h,w]^2

    `masks` = (M, N) from `box_masks`, `teacher_attention` = (A_S^T, A_C^T) from `attention_maps` of the teacher
    (the student's error is weighted by the teacher's attention, as the authors).  A sum over every element
    divided by the batch size only (the authors multiply both maps by the square roots of the weights and take
    ``MSELoss(reduction='sum') / N``, which is the same)."""
    foreground, background = masks
    spatial, channel = teacher_attention
    weighted_error = (teacher - student).pow(2) * spatial[:, None] * channel[:, :, None, None]
    batch = student.shape[0]
    return ((weighted_error * foreground[:, None]).sum() / batch,
            (weighted_error * background[:, None]).sum() / batch)


def attention_loss(student_attention: tuple[torch.Tensor, torch.Tensor],
                   teacher_attention: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention loss (paper eq. 6, before gamma): the L1 distance of the spatial and of the channel attention
    (`attention_maps`), each summed over positions (channels) and divided by the batch size:

        L_at = (1 / B) (sum |A_S^T - A_S^S| + sum |A_C^T - A_C^S|)"""
    (student_spatial, student_channel), (teacher_spatial, teacher_channel) = student_attention, teacher_attention
    batch = student_spatial.shape[0]
    return ((teacher_channel - student_channel).abs().sum() + (teacher_spatial - student_spatial).abs().sum()) / batch


class GlobalContextBlock(nn.Module):
    """GcBlock (Cao et al. 2019) as FGD uses it: a context vector pooled with a learned softmax over positions,
    transformed by 1x1 conv (C -> C/2) - LayerNorm - ReLU - 1x1 conv (C/2 -> C), and added to every position:

        context[b, c] = sum_p softmax_p(W_k F[b, :, p] + b_k) F[b, c, p]
        G(F) = F + W_2 ReLU(LN(W_1 context + b_1)) + b_2

    Initialised as the authors: the pooling conv Kaiming-normal (fan in, ReLU gain) with zero bias, the last conv
    all zero, so G starts as the identity."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // 2
        self.context_logits = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(nn.Conv2d(channels, hidden, kernel_size=1), nn.LayerNorm([hidden, 1, 1]),
                                       nn.ReLU(), nn.Conv2d(hidden, channels, kernel_size=1))
        nn.init.kaiming_normal_(self.context_logits.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_logits.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        batch, channels = feature.shape[:2]
        weights = F.softmax(self.context_logits(feature).reshape(batch, 1, -1), dim=2)  # (B, 1, HW)
        context = torch.bmm(feature.reshape(batch, channels, -1), weights.transpose(1, 2))  # (B, C, 1)
        return feature + self.transform(context.reshape(batch, channels, 1, 1))


def global_loss(student: torch.Tensor, teacher: torch.Tensor, student_block: nn.Module,
                teacher_block: nn.Module) -> torch.Tensor:
    """The global loss (paper eq. 8, before lambda): each map through its own GcBlock, then the squared error
    summed over every element and divided by the batch size:

        L_global = (1 / B) sum (G_T(T) - G_S(S))^2

    The teacher's block learns too (from this loss alone); the teacher map itself gets no gradient."""
    return (teacher_block(teacher.detach()) - student_block(student)).pow(2).sum() / student.shape[0]


FPN_LEVELS = ("fpn:0", "fpn:1", "fpn:2")


def target_boxes(targets) -> list[torch.Tensor]:
    """The batch's ground-truth boxes, one (n, 4) xyxy tensor per image, from the detection targets."""
    if isinstance(targets, torch.Tensor) or not all(isinstance(t, dict) and "boxes" in t for t in targets):
        raise ConfigError("fgd: needs detection targets (one dict with 'boxes' per image) as labels")
    return [target["boxes"] for target in targets]


@register_method("fgd", description="focal (box-masked) + global FPN feature KD", layers="fpn:0, fpn:1, fpn:2 on both detectors, paired in order",
                 family="dense", paper="Yang et al. 2022, Focal and Global Knowledge Distillation for Detectors")
class FGD(Method):
    """Focal and Global Distillation for detectors, as the authors' ``FeatureLoss`` (github.com/yzd-v/FGD,
    ``mmdet/distillation/losses/fgd.py``).

    For each (student, teacher) FPN level pair: a 1x1 conv (with bias) brings the student map to the teacher's
    width when they differ (none when equal); the teacher's attention (`attention_maps`) weighs the foreground
    and background errors (`box_masks`, `focal_loss`); the student's attention, from its aligned map, must match
    the teacher's (`attention_loss`); and a `GlobalContextBlock` pair of its own per level gives `global_loss`.
    The level's loss is alpha L_fg + beta L_bg + gamma L_at + lambda L_global; levels are summed.  The boxes are
    the ground-truth boxes of the batch (``ctx.labels``, xyxy in input pixels), mapped to each level with the
    ratio of the level's size to the input image size (``setup.example_input``), as the authors map them with
    the level's size over ``img_shape``.  Student and teacher maps must have the same spatial size (the authors
    assert it).

    Defaults: the authors' RetinaNet recipe (``configs/distillers/fgd/fgd_retina_r101_fpn_2x_distill_retina_r50_
    fpn_2x_coco.py``, also their GFL and RetinaNet-X101 recipes): temperature 0.5, alpha 1e-3, beta 5e-4,
    gamma 5e-4, lambda 5e-6, with the detector's own losses at weight 1.  Their other recipes: Faster / Mask /
    Cascade R-CNN alpha 5e-5, beta 2.5e-5, gamma 5e-5, lambda 5e-7 on levels 0-3; FCOS temperature 0.8 and
    RepPoints alpha 1.6e-3, beta 8e-4, gamma 8e-4, lambda 8e-6.  The weights suit 256-channel FPN maps of
    800-pixel images: every term is a sum over the map divided by the batch size only.

    Levels: the reference distils every FPN output (``neck.fpn_convs.{0..4}.conv``, P3-P7 on RetinaNet).
    torchvision's FPN computes P6/P7 inside its extra block (``LastLevelP6P7``), which cannot be tapped as
    tensors, so the default here is the three levels it outputs from ``layer_blocks`` (``fpn:0..2``, P3-P5).

    Not implemented: the authors' recipe also initialises the student's neck and head from the teacher's
    checkpoint (``init_student=True``) and clips gradients at norm 35; both are training-recipe steps outside the
    loss.

    Options:
        alpha: weight of the foreground feature loss L_fg (the authors' alpha_fgd)
        beta: weight of the background feature loss L_bg (beta_fgd)
        gamma: weight of the attention loss L_at (gamma_fgd)
        lambda_global: weight of the global (GcBlock) loss L_global (lambda_fgd)
        temperature: softmax temperature of the spatial and channel attention (temp)
        student_layers: student taps, paired in order with teacher_layers (FPN levels)
        teacher_layers: teacher taps, one per student tap, of the same spatial size
    """

    ce_weight = 1.0
    reads_maps = True
    reads_labels = True
    reads_teacher_logits = False
    tasks = frozenset({"detection"})

    def __init__(self, alpha: NonNegative = 1e-3, beta: NonNegative = 5e-4, gamma: NonNegative = 5e-4,
                 lambda_global: NonNegative = 5e-6, temperature: Positive = 0.5,
                 student_layers: Sequence[str] = FPN_LEVELS, teacher_layers: Sequence[str] = FPN_LEVELS):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.lambda_global = lambda_global
        self.temperature = temperature
        self.student_taps, self.teacher_taps = layer_pairs("fgd", student_layers, teacher_layers)
        self._input_size: tuple[int, int] | None = None  # (H, W) of the input images, from `build`

    def build(self, setup) -> None:
        if setup.example_input is None:
            raise ConfigError("fgd: needs example_input (the input image size) to map the boxes to each FPN level")
        self._input_size = tuple(setup.example_input.shape[-2:])
        aligners, student_blocks, teacher_blocks = [], [], []
        for student_tap, teacher_tap in zip(self.student_taps, self.teacher_taps):
            student_shape, teacher_shape = map_shapes("fgd", setup, student_tap, teacher_tap, same_size=True)
            student_channels, teacher_channels = student_shape[1], teacher_shape[1]
            if teacher_channels < 2:
                raise ConfigError(f"fgd: teacher_layers {teacher_tap!r} has {teacher_channels} channel; the GcBlock "
                                  "needs at least 2 (it halves the width)")
            aligners.append(width_aligner(student_channels, teacher_channels))
            student_blocks.append(GlobalContextBlock(teacher_channels))
            teacher_blocks.append(GlobalContextBlock(teacher_channels))
        self.aligners = nn.ModuleList(aligners)
        self.student_blocks = nn.ModuleList(student_blocks)
        self.teacher_blocks = nn.ModuleList(teacher_blocks)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        if self._input_size is None:
            raise ConfigError("fgd: build(setup) must run before forward (it reads the input image size)")
        boxes = target_boxes(ctx.labels)
        terms = {"fgd_fg": 0.0, "fgd_bg": 0.0, "fgd_attention": 0.0, "fgd_global": 0.0}
        for index, (student_tap, teacher_tap) in enumerate(zip(self.student_taps, self.teacher_taps)):
            student = self.aligners[index](ctx.student[student_tap])
            teacher = ctx.teacher[teacher_tap].detach()
            masks = box_masks([b.to(teacher.device) for b in boxes], tuple(teacher.shape[-2:]), self._input_size)
            masks = tuple(mask.to(teacher.dtype) for mask in masks)
            teacher_attention = attention_maps(teacher, self.temperature)
            student_attention = attention_maps(student, self.temperature)
            foreground, background = focal_loss(student, teacher, masks, teacher_attention)
            terms["fgd_fg"] = terms["fgd_fg"] + self.alpha * foreground
            terms["fgd_bg"] = terms["fgd_bg"] + self.beta * background
            terms["fgd_attention"] = terms["fgd_attention"] + self.gamma * attention_loss(student_attention,
                                                                                          teacher_attention)
            terms["fgd_global"] = terms["fgd_global"] + self.lambda_global * global_loss(
                student, teacher, self.student_blocks[index], self.teacher_blocks[index])
        return terms
