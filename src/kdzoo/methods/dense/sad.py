"""SAD: the spatial attention distilling of Chu et al., "Group channel pruning and spatial attention distilling
for object detection", Applied Intelligence 2022 (arXiv 2306.01526)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method

__all__ = ["SAD", "attention_energy", "sad_level_loss", "sad_loss", "spatial_attention"]

# the three deepest stages: stage:1..3 of a segmenter or CIFAR ResNet with a stem, the three scales of a detector
# backbone (layer2..4), as the three YOLO head scales the paper distils
DEEPEST_THREE = ("stage:-3", "stage:-2", "stage:-1")


def attention_energy(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The un-normalised spatial attention of a (B, C, H, W) map: E[b, y, x] = (1/C) sum_c |F[b, c, y, x]|^p,
    shape (B, H, W).  The authors' ``at()`` takes ``x.pow(2).mean(1)``; |.| makes other powers well defined."""
    return feature.abs().pow(p).mean(1)


def spatial_attention(feature: torch.Tensor, p: float = 2.0,
                      size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """A = E / ||E||_2 with E = `attention_energy` flattened per sample, shape (B, H * W): each sample's map has
    unit L2 norm.  With `size`, E is bilinearly resized to `size` (H, W) before the normalisation."""
    energy = attention_energy(feature, p)
    if size is not None and tuple(energy.shape[-2:]) != tuple(size):
        energy = F.interpolate(energy.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return F.normalize(energy.flatten(1), dim=1)


def sad_level_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """One level's term: mean over the batch and the teacher's H * W positions of (A_T - A_S)^2, the student's
    attention resized to the teacher's map size.  The teacher side is detached."""
    size = tuple(teacher_feature.shape[-2:])
    student_attention = spatial_attention(student_feature, p, size)
    teacher_attention = spatial_attention(teacher_feature.detach(), p)
    return (teacher_attention - student_attention).pow(2).mean()


def sad_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
             level_weights: Sequence[float], p: float = 2.0) -> torch.Tensor:
    """sum_j w_j * `sad_level_loss`(S_j, T_j) over the paired levels j (a sum, not a mean, as the authors)."""
    terms = [w * sad_level_loss(s, t, p) for s, t, w in zip(student_features, teacher_features, level_weights)]
    return torch.stack(terms).sum()


@register_method("sad", description="spatial attention maps at several stages", layers="the three deepest stages (stage:-3..-1) on both models, paired in order",
                 family="dense", scope="the spatial attention distilling stage only; the group channel pruning "
                 "that precedes it in the paper is not part of kdzoo",
                 paper="Chu et al. 2022, Group channel pruning and spatial attention distilling for object detection")
class SAD(Method):
    """Spatial attention distilling, the third stage of the paper's prune-then-distil pipeline, as a feature-only
    loss added to the task loss (the authors add it to the YOLO loss at weight 1: ``ce_weight`` 1).

    What is the paper's: it distils "spatial attention information from the feature maps of specific scales in
    each group" (abstract), the groups being its pruning groups of YOLOv4 layers.  The formula is read from the
    authors' code (github.com/chumingqian/Model_Compression_For_YOLOV3-V4, ``utils/utils.py``: ``at`` and
    ``compute_lost_group_AT``, selected by ``train.py --AT_str 2``), since the paper's own text was not at hand:
    for each tapped layer j, A_j = normalize(mean_c F_j^2) per sample (activation attention as Zagoruyko &
    Komodakis' AT), term_j = mean over batch and positions of (A_T,j - A_S,j)^2, and the loss is
    sum_j beta_g(j) * term_j with one beta per group: on YOLOv4, 9 layers, beta 1e6 for the 4 backbone (CSPDarknet)
    layers at strides 2-16, 1e4 for 3 neck layers (strides 8-16), 1e3 for 2 stride-32 layers.  The same
    repository's YOLOv3 recipes (``..._for_v3_darknet53``, ``..._for_v3_mobilenet``) use beta 1000 for every group.

    What is this implementation's reading: levels are any paired taps, by default the three deepest stages of
    both models (``stage:-3..-1``: ``stage:1..3`` of ``seg:tiny`` or a CIFAR ResNet), three encoder scales as
    YOLOv4 has three head scales; the paper's own layers are YOLOv4's.  ``weight`` x ``level_weights[j]`` is
    the beta of level j.  The default, 1000 per level, is the authors' uniform (YOLOv3) beta: their YOLOv4 betas
    are tuned to that network's large maps (each term scales as 1 / (H W)); their YOLOv4 recipe is weight 1000
    with level_weights 1000 / 10 / 1 by group.  Where student and teacher maps differ in size (never in the
    paper: the pruned student keeps the teacher's architecture) the student's energy map is bilinearly resized
    to the teacher's before normalising.  No adapter: attention maps have no channel dimension.

    Not implemented: dynamic sparse training and group channel pruning (the paper's first two stages, which make
    the student); the output distillation terms of the authors' ``compute_lost_group_AT_KD`` (``--AT_str 3``:
    KL on class scores at T=3 and L2 on decoded boxes of the YOLO outputs), and the ground-truth-box mask of
    ``compute_lost_fine_grained_group_AT_KD`` (``--AT_str 10``).

    Options:
        weight: multiplier of the whole loss (0 turns it off); beta of a level is weight x its level_weights entry
        level_weights: relative weight of each level, one per tap pair (the authors' per-group beta)
        p: power of |feature| averaged over channels to form the attention map (the authors' 2)
        student_layers: student taps, one per level, paired in order with teacher_layers
        teacher_layers: teacher taps, one per level; a map of another size than the student's is the target size
    """

    ce_weight = 1.0
    reads_maps = True
    reads_teacher_logits = False  # features only: the teacher's forward may stop at its deepest tap
    tasks = frozenset({"segmentation", "detection", "classification"})

    def __init__(self, weight: NonNegative = 1000.0, level_weights: Sequence[NonNegative] = (1.0, 1.0, 1.0),
                 p: Positive = 2.0, student_layers: Sequence[str] = DEEPEST_THREE,
                 teacher_layers: Sequence[str] = DEEPEST_THREE):
        super().__init__()
        if not student_layers or len(student_layers) != len(teacher_layers):
            raise ConfigError(f"sad: student_layers ({len(student_layers)}) and teacher_layers "
                              f"({len(teacher_layers)}) must name the same number (at least 1) of levels")
        if len(level_weights) != len(student_layers) or any(w < 0 for w in level_weights):
            raise ConfigError(f"sad: level_weights {list(level_weights)} must give one number >= 0 per level "
                              f"({len(student_layers)} levels)")
        self.weight = weight
        self.level_weights = tuple(float(w) for w in level_weights)
        self.p = p
        self.student_taps = tuple(student_layers)
        self.teacher_taps = tuple(teacher_layers)

    def build(self, setup) -> None:
        for s, t in zip(self.student_taps, self.teacher_taps):
            s_shape, t_shape = tuple(setup.student_shapes[s]), tuple(setup.teacher_shapes[t])
            if len(s_shape) != 4 or len(t_shape) != 4:
                raise ConfigError(f"sad: student {s} {list(s_shape)} and teacher {t} {list(t_shape)} must both be "
                                  "(B, C, H, W) feature maps; name map layers with student_layers / teacher_layers")
            if t_shape[-2] * t_shape[-1] < 2:
                raise ConfigError(f"sad: teacher {t} is a 1x1 map ({list(t_shape)}): its normalised attention is "
                                  "the constant 1; name larger maps with student_layers / teacher_layers")

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        students = [ctx.student[s] for s in self.student_taps]
        teachers = [ctx.teacher[t] for t in self.teacher_taps]
        return {"sad": self.weight * sad_loss(students, teachers, self.level_weights, self.p)}
