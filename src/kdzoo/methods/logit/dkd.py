"""DKD: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

The paper rewrites KD as  KD = TCKD + (1 - p_target^teacher) * NCKD:
- TCKD, target-class KD: KL between the binary distributions [p_target, 1 - p_target];
- NCKD, non-target-class KD: KL between the distributions over the non-target classes alone
  (the softmax renormalised without the target class);
and frees the two from that coupling: alpha * TCKD + beta * NCKD.  Both are taken at temperature T,
summed over classes, averaged over the batch and multiplied by T^2, as KD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method, warmup_factor
from .standardize import prepare_logits


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float, standardize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted (TCKD, NCKD).  The teacher is a constant target; `standardize` z-scores the logits first."""
    student_logits, teacher_logits = prepare_logits(student_logits, teacher_logits, standardize)
    target_mask = F.one_hot(labels, student_logits.shape[1]).bool()
    student_scaled, teacher_scaled = student_logits / temperature, teacher_logits / temperature
    tckd = F.kl_div(_target_vs_rest_log_probs(student_scaled, target_mask),
                    _target_vs_rest_log_probs(teacher_scaled, target_mask),
                    reduction="batchmean", log_target=True)
    nckd = F.kl_div(_non_target_log_probs(student_scaled, target_mask),
                    _non_target_log_probs(teacher_scaled, target_mask),
                    reduction="batchmean", log_target=True)
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float, beta: float, temperature: float, standardize: bool = False) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature, standardize)
    return alpha * tckd + beta * nckd


def _target_vs_rest_log_probs(scaled_logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """log [p_target, 1 - p_target] per row, from log-sum-exps so that neither side underflows."""
    log_total = torch.logsumexp(scaled_logits, dim=1)
    log_target = scaled_logits[target_mask] - log_total
    log_rest = torch.logsumexp(scaled_logits.masked_fill(target_mask, float("-inf")), dim=1) - log_total
    return torch.stack([log_target, log_rest], dim=1)


def _non_target_log_probs(scaled_logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the non-target classes only: the target column is dropped, not masked, so the
    KL has no 0 * log 0 term."""
    batch, classes = scaled_logits.shape
    return F.log_softmax(scaled_logits[~target_mask].view(batch, classes - 1), dim=1)


@register_method("dkd", description="KD split in target / non-target terms, reweighted",
                 layers="logits only",
                 family="logit", paper="Zhao et al. CVPR 2022, Decoupled Knowledge Distillation")
class DKD(Method):
    """Defaults: mdistiller's CIFAR-100 setting (CE 1, alpha 1, beta 8, T 4, 20-epoch warm-up); its
    per-pair beta is 2 for res56->res20 and res110->res32, 6 for vgg13->vgg8, vgg13->MV2 and the WRN pairs.

    The DKD term is ramped by `warmup_factor` (mdistiller's convention: 1/warmup in the first epoch).

    Options:
        alpha: weight of the target-class term TCKD
        beta: weight of the non-target-class term NCKD
        temperature: softmax temperature T (loss scaled by T^2)
        warmup_epochs: epochs over which the loss ramps linearly up to full weight (0: no ramp)
        standardize: z-score student and teacher logits before the softmax (logit standardization, Sun et al.
            CVPR 2024)
    """

    reads_labels = True
    ce_weight = 1.0

    def __init__(self, alpha: NonNegative = 1.0, beta: NonNegative = 8.0, temperature: Positive = 4.0,
                 warmup_epochs: NonNegative = 20.0, standardize: bool = False):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.standardize = standardize

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        ramp = warmup_factor(ctx.epoch, self.warmup_epochs)
        tckd, nckd = dkd_terms(ctx.student_logits, ctx.teacher_logits, ctx.labels, self.temperature,
                               self.standardize)
        return {"tckd": ramp * self.alpha * tckd, "nckd": ramp * self.beta * nckd}
