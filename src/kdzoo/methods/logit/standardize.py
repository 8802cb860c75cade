"""Logit standardization: Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024.

A shared temperature forces the student to match the teacher's logit *range*, not only the relations
between classes.  The paper gives every sample its own temperature, proportional to the standard
deviation of its logits, which amounts to z-scoring the logits per sample before the softmax:

    softmax((z - mean(z)) / (std(z) * T_base))

Exact form, as in the authors' code (sunshangquan/logit-standardization-KD, ``normalize`` in
``mdistiller/distillers/KD.py``): mean and *unbiased* (N-1) standard deviation over the classes of each
sample, 1e-7 added to the deviation, applied to student and teacher alike.  ``T_base`` is the loss's own
``temperature`` argument.  Their CIFAR-100 recipe for KD with it: base temperature 2 (3 for some pairs,
e.g. VGG13->VGG8), KD weight 9, instead of KD's T 4, weight 0.9.

KD, DKD, DIST and CTKD take it as an option (``standardize=True``) through `prepare_logits`.
"""
from __future__ import annotations

import torch

STD_EPS = 1e-7  # the authors' value; keeps a constant row (std 0) finite


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row of a (batch, classes) tensor: subtract its mean, divide by its unbiased std."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + STD_EPS)


def prepare_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair every logit loss starts from: the teacher's logits as a constant target (detached, so no
    gradient ever reaches the teacher), in at least float32 (a softmax/KL of bf16 logits loses a fifth of the loss under
    CPU autocast), and both z-scored when `standardize` is set."""
    student_logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    teacher_logits = teacher_logits.detach().to(torch.promote_types(teacher_logits.dtype, torch.float32))
    if standardize:
        return standardize_logits(student_logits), standardize_logits(teacher_logits)
    return student_logits, teacher_logits
