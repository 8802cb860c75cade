"""Token-level distillation losses over (batch, seq, vocab) logits, as pure functions.

Every function takes the student's logits, the teacher's (dense logits, or a sparse top-k view of them),
and a (batch, seq) ``mask`` that is True where a position's next-token distribution counts (not padding,
not prompt).  Each returns the mean over counted positions of a per-position divergence summed over the
vocabulary; a batch with no counted position gives 0 (with a gradient path, so a step never breaks).

Conventions chosen here (and why):
- ``temperature`` divides both sides' logits and the result is multiplied by T**2 (Hinton et al.), so the
  gradient scale does not shrink as T grows.  T = 1 leaves the losses as written in the papers.
- Generalized JSD follows GKD (Agarwal et al., 2024) as TRL writes it: ``M = beta*P_teacher + (1-beta)*P_student``
  and ``JSD_beta = beta*KL(P_t||M) + (1-beta)*KL(P_s||M)``; beta = 0 and beta = 1 are read as forward
  KL(t||s) and reverse KL(s||t), the limits GKD's gradient takes (the mixture form itself vanishes there).
- Sparse teacher (offline top-k): the teacher is known on K tokens (its tempered logits there) plus the
  log-sum-exp of its tempered logits over the whole vocabulary, so the K probabilities are exact and the
  rest of the mass, ``1 - sum_k p_k``, is known too (DistillKit keeps the teacher's normaliser for this
  reason).  The divergence is taken between the (K+1)-outcome distributions "one of the K tokens, or any
  other token" of teacher and student.  This is exactly the dense divergence when the tail is empty, and a
  lower bound of it otherwise (grouping outcomes never increases an f-divergence).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "masked_mean", "forward_kl_loss", "reverse_kl_loss", "generalized_jsd_loss", "total_variation_loss",
    "sparse_forward_kl_loss", "sparse_reverse_kl_loss", "sparse_generalized_jsd_loss",
    "sparse_total_variation_loss", "sparse_log_probs", "token_divergence",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TAIL_FLOOR = 1e-6  # a few float32 eps: a tail below it is rounding, not mass


def masked_mean(per_position: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of a (batch, seq) tensor over positions where `mask` is True (all when mask is None)."""
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p||q) summed over the last dimension; terms with p = 0 are 0 (also when q = 0 there)."""
    p = log_p.exp()
    # mask the log ratio before multiplying: -inf - -inf would put NaN into the gradient of p
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * log_ratio).sum(-1)


def token_divergence(kind: str, log_p_teacher: torch.Tensor, log_q_student: torch.Tensor,
                     beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between two distributions given as log-probabilities on the last dimension."""
    if kind == "forward_kl":
        return _kl_from_log_probs(log_p_teacher, log_q_student)
    if kind == "reverse_kl":
        return _kl_from_log_probs(log_q_student, log_p_teacher)
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must lie in [0, 1], got {beta}")
        if beta == 0.0:
            return _kl_from_log_probs(log_p_teacher, log_q_student)
        if beta == 1.0:
            return _kl_from_log_probs(log_q_student, log_p_teacher)
        log_m = torch.logsumexp(torch.stack([log_p_teacher + math.log(beta),
                                             log_q_student + math.log(1.0 - beta)]), dim=0)
        return beta * _kl_from_log_probs(log_p_teacher, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q_student, log_m)
    if kind == "tvd":
        return 0.5 * (log_p_teacher.exp() - log_q_student.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; known: {', '.join(DIVERGENCES)}")


def _dense(kind: str, student_logits, teacher_logits, mask, temperature, beta=0.5) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (same tokenizer and vocabulary size needed)")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # the teacher is a fixed target
    return masked_mean(token_divergence(kind, log_p, log_q, beta), mask) * temperature ** 2


def forward_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position (mean-seeking; classic KD, Hinton et al. 2015)."""
    return _dense("forward_kl", student_logits, teacher_logits, mask, temperature)


def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) per position (mode-seeking; MiniLLM, Gu et al. 2024)."""
    return _dense("reverse_kl", student_logits, teacher_logits, mask, temperature)


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         mask: Optional[torch.Tensor] = None, beta: float = 0.5,
                         temperature: float = 1.0) -> torch.Tensor:
    """GKD's generalized Jensen-Shannon divergence with mixture weight `beta` on the teacher."""
    return _dense("jsd", student_logits, teacher_logits, mask, temperature, beta)


def total_variation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         mask: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance 0.5 * sum |p - q| per position."""
    return _dense("tvd", student_logits, teacher_logits, mask, temperature)


# ---------------------------------------------------------------- sparse (top-k) teacher


def sparse_log_probs(student_logits: torch.Tensor, topk_indices: torch.Tensor, topk_logits: torch.Tensor,
                     teacher_logsumexp: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities over K+1 outcomes: the K cached tokens, then "any other token".

    `topk_logits` are the teacher's logits divided by `temperature` at `topk_indices`; `teacher_logsumexp` is the
    log-sum-exp of those tempered logits over the full vocabulary (both as the offline cache stores them).
    """
    if topk_indices.shape != topk_logits.shape or topk_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"top-k indices {tuple(topk_indices.shape)} / values {tuple(topk_logits.shape)} do not "
                         f"match student logits {tuple(student_logits.shape)}")
    log_p_top = topk_logits.detach().float() - teacher_logsumexp.detach().float().unsqueeze(-1)
    log_q_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_top = log_q_all.gather(-1, topk_indices.long())
    return (torch.cat([log_p_top, _log_tail(log_p_top)], -1), torch.cat([log_q_top, _log_tail(log_q_top)], -1))


def _log_tail(log_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(log_top)), computed as log(-expm1(logsumexp)) for accuracy.  A tail below TAIL_FLOOR (an
    empty tail, up to rounding) is held at the floor on both sides: otherwise a tail that rounds to 0 on one side
    only would make a reverse KL infinite; the error this allows is about 1e-5 per position."""
    total = torch.logsumexp(log_top, dim=-1, keepdim=True).clamp_max(0.0)
    return (-torch.expm1(total)).clamp_min(TAIL_FLOOR).log()


def _sparse(kind, student_logits, topk_indices, topk_logits, teacher_logsumexp, mask, temperature, beta=0.5):
    log_p, log_q = sparse_log_probs(student_logits, topk_indices, topk_logits, teacher_logsumexp, temperature)
    return masked_mean(token_divergence(kind, log_p, log_q, beta), mask) * temperature ** 2


def sparse_forward_kl_loss(student_logits, topk_indices, topk_logits, teacher_logsumexp, mask=None,
                           temperature: float = 1.0) -> torch.Tensor:
    """Forward KL against a top-k teacher with its tail mass as one extra outcome."""
    return _sparse("forward_kl", student_logits, topk_indices, topk_logits, teacher_logsumexp, mask, temperature)


def sparse_reverse_kl_loss(student_logits, topk_indices, topk_logits, teacher_logsumexp, mask=None,
                           temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL against a top-k teacher with its tail mass as one extra outcome."""
    return _sparse("reverse_kl", student_logits, topk_indices, topk_logits, teacher_logsumexp, mask, temperature)


def sparse_generalized_jsd_loss(student_logits, topk_indices, topk_logits, teacher_logsumexp, mask=None,
                                beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalized JSD against a top-k teacher with its tail mass as one extra outcome."""
    return _sparse("jsd", student_logits, topk_indices, topk_logits, teacher_logsumexp, mask, temperature, beta)


def sparse_total_variation_loss(student_logits, topk_indices, topk_logits, teacher_logsumexp, mask=None,
                                temperature: float = 1.0) -> torch.Tensor:
    """Total variation against a top-k teacher with its tail mass as one extra outcome."""
    return _sparse("tvd", student_logits, topk_indices, topk_logits, teacher_logsumexp, mask, temperature)
