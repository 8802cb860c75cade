"""Head KD: distillation of a single-stage detector's dense head outputs, its class scores and its box regression
(the prediction-mimicking line of work: LD, Zheng et al., "Localization Distillation for Dense Object Detection",
CVPR 2022; CrossKD, Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection", CVPR 2024)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method, Setup

__all__ = ["HeadKD", "box_regression_imitation", "localization_distillation", "sigmoid_score_distillation"]

BOXES_TAP = "head_boxes:0"  # the dense head's box regression, (B, anchors, 4) or (B, anchors, 4 * bins)
SMOOTH_L1_BETA = 1.0  # torchvision's smooth-L1 box loss default (`_box_loss`, cnf["beta"] unset)


def sigmoid_score_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                               temperature: float = 1.0, focal_beta: float = 1.0) -> torch.Tensor:
    """Distillation of a sigmoid classification head: every class of every anchor is a binary problem whose
    target is the teacher's probability.  With ``s = student / T``, ``p_s = sigmoid(s)`` and
    ``p_t = sigmoid(teacher / T)``::

        focal_beta > 0:  l[a, k] = BCE(s[a, k], p_t[a, k]) * |p_s[a, k] - p_t[a, k]| ** focal_beta
        focal_beta = 0:  l[a, k] = BCE(s[a, k], p_t[a, k]) - H(p_t[a, k])      (the binary KL)
        loss = T^2 * mean_a sum_k l[a, k]

    with ``BCE(s, p) = -p log sigmoid(s) - (1 - p) log(1 - sigmoid(s))`` and ``H(p) = BCE(logit(p), p)``: per-class
    binary cross-entropy summed over the K classes, averaged over the anchors (every leading dimension: batch and
    anchors).  ``focal_beta > 0`` is CrossKD's ``kd_quality_focal_loss`` (jbwang1997/CrossKD
    mmdet/models/losses/kd_loss.py, ``KDQualityFocalLoss``, beta 1 in every config) = BCKD's ``novel_kd_loss``
    (TinyTigerPan/BCKD mmdet/models/losses/kd_loss.py, beta 1): the quality-focal modulator makes the term vanish where
    the student already agrees.  ``focal_beta = 0`` is the plain sigmoid KD; it is reported as the binary KL (the
    cross-entropy minus the teacher's entropy, a constant: the same gradient) so that it reads 0 at a perfect match.
    Neither reference uses a temperature (T = 1); T > 1 softens both sides as Hinton's KD does, and the T^2 keeps the
    gradient's scale.  The references divide the sum by the number of positive anchors of their assigner;
    torchvision's heads keep their matching to themselves, so the sum is averaged over all anchors here.
    No gradient reaches `teacher_logits`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"head_kd: the student's class logits {list(student_logits.shape)} and the teacher's "
                          f"{list(teacher_logits.shape)} differ: both detectors need the same anchors and classes")
    scaled_student = student_logits / temperature
    scaled_teacher = teacher_logits.detach() / temperature
    teacher_probs = torch.sigmoid(scaled_teacher)
    cross_entropy = F.binary_cross_entropy_with_logits(scaled_student, teacher_probs, reduction="none")
    if focal_beta == 0:
        teacher_entropy = F.binary_cross_entropy_with_logits(scaled_teacher, teacher_probs, reduction="none")
        per_class = cross_entropy - teacher_entropy
    else:
        per_class = cross_entropy * (torch.sigmoid(scaled_student) - teacher_probs).abs().pow(focal_beta)
    return per_class.sum(-1).mean() * temperature ** 2


def teacher_scores(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Each anchor's weight: the teacher's highest class probability, ``max_k sigmoid(teacher[a, k])`` (detached)."""
    return torch.sigmoid(teacher_logits.detach().amax(dim=-1))


def box_regression_imitation(student_boxes: torch.Tensor, teacher_boxes: torch.Tensor, anchor_weights: torch.Tensor,
                             box_loss: str = "l1") -> torch.Tensor:
    """Imitation of a head's box regression, each anchor weighted by how sure the teacher is an object is there::

        loss = mean_a  w[a] * sum_c rho(student[a, c] - teacher[a, c])

    over the anchors a (batch included) and the regression's coordinates c (4 per anchor), with ``w`` the
    `anchor_weights` (the method passes `teacher_scores`: background anchors, where the teacher's best class
    probability is low, count little) and ``rho`` the L1 (``|x|``), smooth-L1 (``x^2 / 2`` below 1, ``|x| - 1/2``
    above: torchvision's, beta 1) or squared (``x^2``) penalty.  The outputs compared are what the head regresses:
    RetinaNet's encoded deltas (dx, dy, log dw, log dh), FCOS's edge distances divided by the anchor size, so
    both are already free of the object's scale.  The weighting is CrossKD's ``reg_weights`` (the teacher's max
    sigmoid class score; CrossKD/mmdet/models/detectors/crosskd_retinanet.py ``pred_mimicking_loss_single``) and
    Mehta & Ozturk's objectness-scaled distillation ("Object detection at 200 Frames Per Second", ECCV-W 2018: the
    regression mimicking term scaled by the teacher's objectness); CrossKD compares decoded boxes by GIoU, here
    the raw regressions are compared (no anchors needed), which is our reading.  No gradient reaches the teacher.
    """
    if student_boxes.shape != teacher_boxes.shape:
        raise ConfigError(f"head_kd: the student's box regression {list(student_boxes.shape)} and the teacher's "
                          f"{list(teacher_boxes.shape)} differ: both detectors need the same anchors")
    difference = student_boxes - teacher_boxes.detach()
    if box_loss == "l1":
        penalty = difference.abs()
    elif box_loss == "smooth_l1":
        penalty = F.smooth_l1_loss(difference, torch.zeros_like(difference), reduction="none", beta=SMOOTH_L1_BETA)
    elif box_loss == "l2":
        penalty = difference.square()
    else:
        raise ConfigError(f"head_kd: box_loss {box_loss!r} is not one of 'l1', 'smooth_l1', 'l2'")
    return (anchor_weights.detach() * penalty.sum(-1)).mean()


def localization_distillation(student_distribution_logits: torch.Tensor,
                              teacher_distribution_logits: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """LD's per-edge loss for a head that predicts each box edge as a distribution over ``n + 1`` bins (GFL)::

        LD[e] = T^2 / (n + 1) * sum_j p_t[e, j] * (log p_t[e, j] - log p_s[e, j]),
        p_s[e] = softmax(student[e] / T),  p_t[e] = softmax(teacher[e] / T)

    over the last dimension (the bins) of (..., n + 1) logits; the result has the leading shape (one value per edge,
    not reduced).  The KL divergence of the softened edge distributions as LD's code computes it: the KL is averaged
    over the bins (``.mean(1)``), not summed as in the paper's equation, and scaled by T^2 (HikariTJU/LD and
    mmdetection mmdet/models/losses/kd_loss.py, ``knowledge_distillation_kl_div_loss``).  No gradient reaches
    the teacher.
    """
    if student_distribution_logits.shape != teacher_distribution_logits.shape:
        raise ConfigError(f"head_kd: the student's box distributions {list(student_distribution_logits.shape)} and "
                          f"the teacher's {list(teacher_distribution_logits.shape)} differ")
    student_log_probs = F.log_softmax(student_distribution_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_distribution_logits.detach() / temperature, dim=-1)
    divergence = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    return divergence.mean(-1) * temperature ** 2


@register_method("head_kd", description="detector head: class-score KD + box imitation/LD",
                 layers="head_logits:0 and head_boxes:0 (the dense head's class logits and box regression)",
                 family="dense", scope="part of LD and CrossKD: class-score KD and box imitation (LD on "
                 "distribution heads) averaged over all anchors; no positive-anchor assigner, no cross-head step",
                 paper="Zheng et al. 2022, Localization Distillation for Dense Object Detection; "
                 "Wang et al. 2024, CrossKD")
class HeadKD(Method):
    """Prediction mimicking on a single-stage detector's dense head (RetinaNet, FCOS, SSD-like heads): the student's
    class logits and box regression, anchor by anchor, follow the teacher's.

    - Class scores (``head[cls_logits]``, `ctx.student_logits`): `sigmoid_score_distillation`, the per-class binary
      cross-entropy to the teacher's sigmoid probabilities with CrossKD's quality-focal modulator.
    - Box regression (tap ``head_boxes:0`` = ``head[bbox_regression]``): a head that regresses boxes directly (4
      numbers per anchor: torchvision's RetinaNet, FCOS, SSD) gets `box_regression_imitation`, weighted by the
      teacher's best class probability per anchor.  A head whose regression is a distribution (GFL style: the last
      dimension 4 * (n + 1) with n + 1 > 1 bins per edge) gets LD instead: `localization_distillation` averaged over
      the 4 edges, weighted the same way.  torchvision has no such head, so on its detectors (and ``det:``) this
      method is the class term plus the box imitation; LD needs a GFL-style head.

    Both detectors must have the same anchors (the same kind of detector at the same input size): the class logits
    and box regressions are compared anchor by anchor.  FCOS's centerness branch is not distilled.

    Defaults: class term weight 1 and beta 1 as CrossKD's RetinaNet recipe (``loss_cls_kd=KDQualityFocalLoss(beta=1,
    loss_weight=1.0)``, configs/crosskd/crosskd_r50_retinanet_r101_fpn_2x_coco.py; BCKD: weight 1, beta 1), no
    temperature (T 1: neither applies one); box weight 1 as CrossKD's RetinaNet ``loss_reg_kd`` (a GIoU there, on
    decoded boxes), L1 as torchvision's RetinaNet regression loss on the same deltas; LD weight 0.25 and temperature
    10 as the LD configs (configs/ld/*: ``KnowledgeDistillationKLDivLoss(loss_weight=0.25, T=10)``).  CrossKD's FCOS
    recipe is class 0.4, box 0.75.  Differences from the references (our reading where they need an assigner that
    torchvision's heads do not expose): every term is averaged over all anchors, where CrossKD divides by the number
    of positive anchors (so the terms are smaller by about anchors / positives at the same weight); LD is applied
    at every anchor weighted by the teacher's best class probability, where LD takes the positive anchors weighted
    by the student's own best score plus its "valuable localization region" (not implemented), and LD's class KD
    (a softmax KL over classes at T 2 on positives, in the authors' repository only) is replaced by the sigmoid
    term; CrossKD's cross-head step (the student's head features through the teacher's head) is not implemented.

    Options:
        class_weight: multiplier of the class-score term (0 turns it off)
        box_weight: multiplier of the box-regression imitation term (heads that regress 4 numbers per anchor)
        temperature: temperature T of the class-score term (both logits divided by T, the loss scaled by T^2)
        focal_beta: exponent of the |p_student - p_teacher| modulator of the class term (0: plain binary KL)
        box_loss: penalty of the box imitation: l1, smooth_l1 (beta 1) or l2
        ld_weight: multiplier of the localization distillation term (distribution heads only)
        ld_temperature: softmax temperature of the localization distillation over each edge's bins
    """

    ce_weight = 1.0
    reads_maps = True
    tasks = frozenset({"detection"})
    student_taps = (BOXES_TAP,)
    teacher_taps = (BOXES_TAP,)

    def __init__(self, class_weight: NonNegative = 1.0, box_weight: NonNegative = 1.0, temperature: Positive = 1.0,
                 focal_beta: NonNegative = 1.0, box_loss: Literal["l1", "smooth_l1", "l2"] = "l1",
                 ld_weight: NonNegative = 0.25, ld_temperature: Positive = 10.0):
        super().__init__()
        self.class_weight = class_weight
        self.box_weight = box_weight
        self.temperature = temperature
        self.focal_beta = focal_beta
        self.box_loss = box_loss
        self.ld_weight = ld_weight
        self.ld_temperature = ld_temperature

    def build(self, setup: Setup) -> None:
        student_shape = list(setup.student_shapes[BOXES_TAP])
        teacher_shape = list(setup.teacher_shapes[BOXES_TAP])
        student_kind = type(setup.student).__name__ if setup.student is not None else ""
        teacher_kind = type(setup.teacher).__name__ if setup.teacher is not None else ""
        if student_shape != teacher_shape or student_kind != teacher_kind:
            raise ConfigError(f"head_kd: the student's {student_kind} box regression {BOXES_TAP} {student_shape} "
                              f"and the teacher's {teacher_kind} {teacher_shape} differ: both detectors need the "
                              "same anchors (the same detector kind and input size)".replace("  ", " "))
        if len(student_shape) != 3 or student_shape[-1] % 4:
            raise ConfigError(f"head_kd: the box regression {BOXES_TAP} {student_shape} is not (B, anchors, 4 * bins)")

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        if ctx.student_logits is None or ctx.teacher_logits is None:
            raise ConfigError("head_kd: the detectors have no dense class logits (a two-stage detector?): head_kd "
                              "distils single-stage heads (RetinaNet, FCOS)")
        student_boxes, teacher_boxes = ctx.student[BOXES_TAP], ctx.teacher[BOXES_TAP]
        losses = {"head_kd_cls": self.class_weight * sigmoid_score_distillation(
            ctx.student_logits, ctx.teacher_logits, self.temperature, self.focal_beta)}
        weights = teacher_scores(ctx.teacher_logits)
        bins = student_boxes.shape[-1] // 4
        if bins > 1:  # a distribution per edge (GFL): LD, averaged over the 4 edges of each anchor
            per_edge = localization_distillation(student_boxes.unflatten(-1, (4, bins)),
                                                 teacher_boxes.unflatten(-1, (4, bins)), self.ld_temperature)
            losses["head_kd_ld"] = self.ld_weight * (weights * per_edge.mean(-1)).mean()
        else:
            losses["head_kd_box"] = self.box_weight * box_regression_imitation(
                student_boxes, teacher_boxes, weights, self.box_loss)
        return losses
