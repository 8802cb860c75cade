"""USKD: universal self-knowledge distillation, from the NKD paper (Yang et al., ICCV 2023).  No teacher.

The student makes its own soft labels, then learns from them with NKD's normalised loss:

- soft target label: the student's own target probability, squared and re-centred on the batch,
  ``p_b^2 + 1 - mean_b(p_b^2)`` (a constant: no gradient flows through it);
- soft non-target labels from Zipf's law: the classes are ranked, and the class at rank r (1-based,
  the target class counted) gets weight 1/r; the target column is dropped and the rest renormalised;
- the rank comes from a *weak* classifier, a linear head on the pooled output of an intermediate
  stage trained with label-smoothed cross-entropy (smoothing 0.1), together with the final logits.

Details as in the authors' code (yzd-v/cls_KD, ``mmcls/models/dis_losses/uskd.py``), where the paper
leaves them open:
- the ranking score is ``w_k / (1 - w_target) + log s_k / (1 - log s_target)`` where w = softmax of the
  weak logits and s = softmax of the final logits.  Their code reuses the name of the log-softmax for
  the second term, so it is the *log*-probability; we keep that, since it is what produced the
  published numbers (the final logits then dominate the order and the weak head breaks near-ties);
- the weak head's loss is ``mu * CE(weak logits, 0.9 * one-hot + 0.1 / C)``; its gradient reaches
  the intermediate feature (the feature is not detached);
- the pooled feature of the stage before the last (``stage:-2``; their ``neck(fea_s[-2])``);
- ties in the ranking are broken by class index (a stable sort), so the labels are deterministic.

Defaults are their CIFAR-100 setting (alpha 0.1, beta 0.1, mu 0.1, CE weight 1); on ImageNet they
use alpha 1, beta 0.1, mu 0.005.  Only hard labels are handled (no mixup/cutmix label mixtures).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import register_method
from ..base import Context, Method, Setup
from ..embeddings import embedding_width, pool_embedding

__all__ = ["uskd_soft_target", "uskd_zipf_labels", "uskd_terms", "uskd_loss", "USKD"]

WEAK_SMOOTHING = 0.1
RANK_EPS = 1e-6  # the authors' guard in the ranking score's denominators


def uskd_soft_target(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, 1) soft target labels: p^2 + 1 - mean over the batch of p^2, p the student's target probability."""
    with torch.no_grad():
        p_target = F.softmax(student_logits.float(), dim=1).gather(1, labels.view(-1, 1))
        squared = p_target**2
        return squared + 1 - squared.mean(dim=0, keepdim=True)


def uskd_zipf_labels(student_logits: torch.Tensor, weak_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, C-1) soft non-target labels: Zipf weights 1/rank over the ranking score, target column dropped,
    renormalised to sum to 1 per sample."""
    with torch.no_grad():
        batch, classes = student_logits.shape
        target = labels.view(-1, 1)
        weak = F.softmax(weak_logits.float(), dim=1)
        log_student = F.log_softmax(student_logits.float(), dim=1)
        score = (weak / (1 - weak.gather(1, target) + RANK_EPS)
                 + log_student / (1 - log_student.gather(1, target) + RANK_EPS))
        by_rank = torch.sort(score, dim=1, descending=True, stable=True).indices  # class ids, best first
        rank = torch.argsort(by_rank, dim=1)  # 0-based rank of each class
        zipf = 1.0 / (rank + 1).float()
        non_target = ~F.one_hot(labels, classes).bool()
        zipf = zipf[non_target].view(batch, classes - 1)
        return zipf / zipf.sum(dim=1, keepdim=True)


def uskd_terms(student_logits: torch.Tensor, weak_logits: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unweighted (target term, non-target term, weak-head term)."""
    student_logits, weak_logits = student_logits.float(), weak_logits.float()
    batch, classes = student_logits.shape
    log_student = F.log_softmax(student_logits, dim=1)
    target_term = -(uskd_soft_target(student_logits, labels) * log_student.gather(1, labels.view(-1, 1))).mean()

    non_target = ~F.one_hot(labels, classes).bool()
    log_rest = F.log_softmax(student_logits[non_target].view(batch, classes - 1), dim=1)
    non_target_term = -(uskd_zipf_labels(student_logits, weak_logits, labels) * log_rest).sum(dim=1).mean()

    weak_term = F.cross_entropy(weak_logits, labels, label_smoothing=WEAK_SMOOTHING)
    return target_term, non_target_term, weak_term


def uskd_loss(student_logits: torch.Tensor, weak_logits: torch.Tensor, labels: torch.Tensor,
              alpha: float = 0.1, beta: float = 0.1, mu: float = 0.1) -> torch.Tensor:
    """alpha * target term + beta * non-target term + mu * weak-head term."""
    target_term, non_target_term, weak_term = uskd_terms(student_logits, weak_logits, labels)
    return alpha * target_term + beta * non_target_term + mu * weak_term


@register_method("uskd", description="no teacher: own soft labels from a weak head",
                 layers="student stage:-2 (the weak head's input); no teacher",
                 family="logit", paper="Yang et al. ICCV 2023, From Knowledge Distillation to "
                 "Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels")
class USKD(Method):
    """Teacher-free: a run needs no ``teacher:`` section.  `layer` is the student tap the weak head reads.

    Options:
        alpha: weight of the target-class term
        beta: weight of the non-target (Zipf soft label) term
        mu: weight of the weak head's label-smoothed cross-entropy
        layer: student tap whose pooled output feeds the weak classifier head
    """

    reads_labels = True
    ce_weight = 1.0
    needs_teacher = False

    def __init__(self, alpha: float = 0.1, beta: float = 0.1, mu: float = 0.1, layer: str = "stage:-2"):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.mu = mu
        self.student_taps = (layer,)

    def build(self, setup: Setup) -> None:
        width = embedding_width(setup.student_shapes[self.student_taps[0]], "uskd")
        self.weak_head = nn.Linear(width, setup.num_classes)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        weak_logits = self.weak_head(pool_embedding(ctx.student[self.student_taps[0]], "uskd"))
        target_term, non_target_term, weak_term = uskd_terms(ctx.student_logits, weak_logits, ctx.labels)
        return {"uskd_target": self.alpha * target_term, "uskd_non_target": self.beta * non_target_term,
                "uskd_weak": self.mu * weak_term}
