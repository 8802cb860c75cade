"""ACAM-KD for dense prediction: Lan & Tian, "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge
Distillation", ICCV 2025 (arXiv 2503.06307).

No code has been published (no repository found; the paper's notes list "Code: N/A").  We could read the arXiv
text's abstract and introduction only; the method section below is taken from public paper notes that transcribe
its equations (papernotes, emergentmind), which agree with each other:

- STCA-FF: Q = W_q F_T, K = W_k F_S, V = W_v F_S with W_q, W_k of C_q = C / 2 rows and W_v square;
  A = softmax(Q^T K / sqrt(C_q)) over the H*W positions, F_fused = A V (the teacher asks, the student answers).
- ASCM: M selection units read the fused feature.  Channel units m^c in R^{M x 1} scale the fused
  feature's spatial mean v in R^{1 x C}: M^c = sigmoid(m^c v) (B, M, C).  Spatial units m^s in R^{M x C} are
  tokens dotted with every position of the flattened fused feature z in R^{C x HW}: M^s = sigmoid(m^s z)
  (B, M, H*W), MasKD's receptive tokens computed on the fused feature instead of the teacher's.
- the masked losses, over the student feature aligned by f_align:
      L^c = 1/M sum_m ||M^c_m (.) (F_T - f_align(F_S))||^2 / (H W sum_k M^c_{m,k})
      L^s = 1/M sum_m ||M^s_m (.) (F_T - f_align(F_S))||^2 / (C sum_p M^s_{m,p})
  the mask multiplies the difference inside the norm (so it weighs the squared error by M^2, as MasKD's code,
  github.com/hunto/MasKD ``MasKDLoss``, which these equations follow) and is normalised by its mass.
- a Dice diversity loss keeps the M masks apart; L = L_task + alpha (L^c + L^s) + lambda L_div, alpha = lambda = 1.
- M = 19 for Cityscapes segmentation (one mask per class) and 6 for detection; distillation on every FPN level
  for detection and on the predicted segmentation maps (the classifier's logits before upsampling, 19 channels,
  as the MasKD segmentation code it compares with: ``MasKDLoss(channels=19)`` on ``s_outputs[0]``) for
  segmentation.

Where the paper is silent, our choices (said again in the class docstring): the selection units, the attention
and the aligner are trained jointly with the student on these same losses (the paper: "by optimizing the two
losses, the adaptive masks dynamically adjust"; no adversarial or separate objective); the fusion reads the
*detached* aligned student, so the student learns from the masked error alone and cannot move its own masks;
units start as MasKD's tokens, N(0, 0.01); the Dice loss is MasKD's pairwise form (mean over ordered pairs i != j
and over the batch) applied to the spatial and to the channel masks, summed; f_align is a 1x1 conv when the
widths differ (identity otherwise, or always with ``always_align``, mmrazor's detection setting); a student map on
another grid is resized to the teacher's; masses are per sample, the batch is averaged; several levels are
summed (MasKD's per-FPN-level losses are summed).  No temperature: the masks are plain sigmoids.

A property of these equations worth knowing: under M^2 weights over an M-mass the loss is proportional to the
masks' scale, so the units, trained on it, can lower it by shrinking every mask (the Dice term is scale-free and
does not stop that).  On random maps the spatial masks fall from 0.5 to about 0.01 within 400 SGD steps (lr 0.01),
and the student's share of the gradient falls with them; ``squared_masks=False`` (M weights, a masked mean) is
the scale-free variant.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ...adapters import resize_like
from ...errors import ConfigError
from ...registry import NonNegative, PositiveInt, register_method
from ..base import Context, Method
from ..crossarch.acam import MASK_FLOOR, CrossAttentionFusion, mask_diversity_loss
from .pairs import layer_pairs, map_shapes, width_aligner

__all__ = ["ACAMKDDense", "SelectionUnits", "acam_kd_masked_losses", "channel_selection_masks",
           "spatial_selection_masks"]

UNIT_INIT_STD = 0.01  # MasKD's receptive-token initialisation


def channel_selection_masks(fused: torch.Tensor, channel_units: torch.Tensor) -> torch.Tensor:
    """ASCM channel masks M^c = sigmoid(m^c v): fused (B, C, H, W), channel_units m^c (M, 1) -> (B, M, C).

    v (B, C) is the fused feature's spatial mean; unit m scales it: M^c[b, m, k] = sigmoid(m^c[m] * v[b, k])."""
    pooled = fused.mean((2, 3))  # (B, C)
    return torch.sigmoid(channel_units.reshape(1, -1, 1) * pooled[:, None, :])


def spatial_selection_masks(fused: torch.Tensor, spatial_units: torch.Tensor) -> torch.Tensor:
    """ASCM spatial masks M^s = sigmoid(m^s z): fused (B, C, H, W), spatial_units m^s (M, C) -> (B, M, H, W).

    M^s[b, m, h, w] = sigmoid(sum_c m^s[m, c] * fused[b, c, h, w])."""
    return torch.sigmoid(torch.einsum("mc,bchw->bmhw", spatial_units, fused))


def acam_kd_masked_losses(student_map: torch.Tensor, teacher_map: torch.Tensor, spatial_masks: torch.Tensor,
                          channel_masks: torch.Tensor, squared: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(L^s, L^c): ACAM-KD's spatial and channel masked feature losses (the paper's L^s_distill, L^c_distill).

    student_map (the aligned student), teacher_map: (B, C, H, W); spatial_masks: (B, M, H, W); channel_masks:
    (B, M, C).  With D = (T - S)^2 per element,

        L^s = mean_b 1/M sum_m  sum_{c,p} M^s[b,m,p]^2 D[b,c,p] / (C   * sum_p M^s[b,m,p])
        L^c = mean_b 1/M sum_m  sum_{k,p} M^c[b,m,k]^2 D[b,k,p] / (H*W * sum_k M^c[b,m,k])

    i.e. ||M (.) (T - S)||^2 over the mask's mass.  ``squared=False`` weighs D by M instead of M^2 (a masked
    mean, independent of the masks' scale: kdzoo's classification ``acam``).  The teacher is detached here;
    gradients reach the student and the masks."""
    channels, height, width = teacher_map.shape[1:]
    error = (teacher_map.detach() - student_map).pow(2)  # (B, C, H, W)
    per_position = error.sum(1)  # (B, H, W): summed over channels
    per_channel = error.sum((2, 3))  # (B, C): summed over positions
    # a mask that saturates to ~0 everywhere would divide 0 by 0: its mass is floored
    spatial_mass = spatial_masks.sum((2, 3)).clamp_min(MASK_FLOOR)  # (B, M)
    channel_mass = channel_masks.sum(2).clamp_min(MASK_FLOOR)  # (B, M)
    spatial_weights = spatial_masks.pow(2) if squared else spatial_masks
    channel_weights = channel_masks.pow(2) if squared else channel_masks
    spatial = (spatial_weights * per_position[:, None]).sum((2, 3)) / (channels * spatial_mass)
    channel = (channel_weights * per_channel[:, None]).sum(2) / (height * width * channel_mass)
    return spatial.mean(), channel.mean()


class SelectionUnits(nn.Module):
    """ASCM's learnable selection units of one level: `count` spatial tokens (M, C) and channel gains (M, 1)."""

    def __init__(self, channels: int, count: int):
        super().__init__()
        self.spatial = nn.Parameter(torch.randn(count, channels) * UNIT_INIT_STD)
        self.channel = nn.Parameter(torch.randn(count, 1) * UNIT_INIT_STD)

    def forward(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(spatial masks (B, M, H, W), channel masks (B, M, C)) from the fused feature."""
        return spatial_selection_masks(fused, self.spatial), channel_selection_masks(fused, self.channel)


@register_method("acam_kd", description="adaptive spatial + channel masks on fused maps",
                 layers="logits:0 -> logits:0 (the predicted segmentation maps, before upsampling)",
                 family="dense",
                 paper="Lan & Tian 2025, ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge "
                       "Distillation")
class ACAMKDDense(Method):
    """ACAM-KD on one or several (B, C, H, W) map pairs (segmentation maps; FPN levels for detection).

    Per level: the student map aligned to the teacher's width (``f_align``, a 1x1 conv) and grid, a cross-attention
    fusion (teacher queries, student keys and values, C_q = C // 2), M selection units giving spatial and channel
    masks, the masked losses `acam_kd_masked_losses` and the Dice diversity of the masks.  Losses: ``acam_kd`` =
    ``weight`` x sum over levels of (L^s + L^c); ``acam_kd_diversity`` = ``diversity_weight`` x sum over levels of
    (Dice(spatial masks) + Dice(channel masks)), absent with one mask.

    Defaults are the paper's segmentation recipe (Cityscapes, DeepLabV3-R101 -> DeepLabV3-MobileNetV2 / R18,
    PSPNet-R18): alpha = lambda = 1, the predicted segmentation maps (``logits:0`` on both sides, as the MasKD
    segmentation code it compares with), one mask per class (M = 19 on Cityscapes; ``num_masks`` null takes the
    run's class count).  The paper's detection recipe: every FPN level on both sides, ``num_masks: 6``.

    Our reading where the paper is silent: the selection units, the attention and the aligner train with the
    student on these losses (no adversarial or separate objective); the fusion reads the detached student, so the
    student's gradient is the masked regression alone; units start at N(0, 0.01) (MasKD's tokens); the Dice term
    covers both mask kinds; a student map on another grid is resized to the teacher's (bilinear up, average-pool
    down); levels are summed.  Trained on M^2-weighted losses the masks can shrink (see the module docstring;
    ``squared_masks: false`` avoids it).  Not implemented: the paper's "inheritance" initialisation of the
    student's detection neck and head from the teacher (a detection-recipe step outside the loss).

    Options:
        weight: multiplier alpha of the masked feature losses (spatial + channel), summed over levels
        diversity_weight: weight lambda of the Dice diversity loss between masks
        num_masks: selection units M per level; null: the number of classes (the paper's segmentation setting)
        student_layers: student taps, paired in order with teacher_layers (e.g. several FPN levels)
        teacher_layers: teacher taps, one per student tap
        always_align: put the 1x1 conv on the student even when the widths match (mmrazor's detection setting)
        squared_masks: the mask multiplies the difference inside the norm (M^2 weights, the paper's equations);
            false: M weights, a masked mean the masks' scale cannot shrink
    """

    ce_weight = 1.0
    reads_maps = True
    reads_teacher_logits = False  # taps only: the teacher's upsampled logits are never read
    tasks = frozenset({"segmentation", "detection"})

    def __init__(self, weight: NonNegative = 1.0, diversity_weight: NonNegative = 1.0,
                 num_masks: Optional[PositiveInt] = None, student_layers: Sequence[str] = ("logits:0",),
                 teacher_layers: Sequence[str] = ("logits:0",), always_align: bool = False,
                 squared_masks: bool = True):
        super().__init__()
        self.weight = weight
        self.diversity_weight = diversity_weight
        self.num_masks = num_masks
        self.always_align = always_align
        self.squared_masks = squared_masks
        self.student_taps, self.teacher_taps = layer_pairs("acam_kd", student_layers, teacher_layers)

    def build(self, setup) -> None:
        count = self.num_masks if self.num_masks is not None else setup.num_classes
        if count is None or count < 1:
            raise ConfigError(f"acam_kd: num_masks is null and the run has no class count ({count!r}); set num_masks")
        self.mask_count = int(count)
        aligners, fusions, units = [], [], []
        for student_tap, teacher_tap in zip(self.student_taps, self.teacher_taps):
            student_shape, teacher_shape = map_shapes("acam_kd", setup, student_tap, teacher_tap)
            channels = teacher_shape[1]
            aligners.append(width_aligner(student_shape[1], channels, self.always_align))
            fusions.append(CrossAttentionFusion(channels, max(channels // 2, 1)))
            units.append(SelectionUnits(channels, self.mask_count))
        self.aligners = nn.ModuleList(aligners)
        self.fusions = nn.ModuleList(fusions)
        self.selection_units = nn.ModuleList(units)

    def level_losses(self, index: int, student_map: torch.Tensor,
                     teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L^s, L^c, spatial + channel Dice diversity) of level `index` for a student and a teacher map."""
        teacher = teacher_map.detach()
        student = resize_like(self.aligners[index](student_map), teacher.shape[-2:])
        fused = self.fusions[index](student.detach(), teacher)
        spatial_masks, channel_masks = self.selection_units[index](fused)
        spatial, channel = acam_kd_masked_losses(student, teacher, spatial_masks, channel_masks, self.squared_masks)
        if self.mask_count > 1:
            diversity = mask_diversity_loss(spatial_masks) + mask_diversity_loss(channel_masks)
        else:
            diversity = spatial.new_zeros(())
        return spatial, channel, diversity

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        masked, diversity = 0.0, 0.0
        for index, (student_tap, teacher_tap) in enumerate(zip(self.student_taps, self.teacher_taps)):
            spatial, channel, level_diversity = self.level_losses(index, ctx.student[student_tap],
                                                                  ctx.teacher[teacher_tap])
            masked = masked + spatial + channel
            diversity = diversity + level_diversity
        losses = {"acam_kd": self.weight * masked}
        if self.mask_count > 1 and self.diversity_weight:
            losses["acam_kd_diversity"] = self.diversity_weight * diversity
        return losses
