"""MI-alpha: the interpolated mutual-information bound of Distiller (He et al. 2021, "Distiller: A Systematic
Study of Model Distillation Methods in Natural Language Processing"), applied to next-token distributions.

Distiller casts intermediate-representation distillation as maximising a lower bound on the mutual information
I(teacher; student) and proposes the MI-alpha class of bounds "with a better bias/variance trade-off": the
interpolated bound I_alpha of Poole et al. 2019 ("On Variational Bounds of Mutual Information", eq. 13), whose
baseline mixes the InfoNCE baseline (alpha = 1: low variance, high bias) with a fixed one (alpha = 0: the NWJ
bound, low bias, high variance).  With scores s[i, j] = f(student_j, teacher_i) over N positions, the
leave-one-out baseline of row i holding out column j is

    b[i, j] = log( alpha * mean_{l != j} exp(s[i, l]) + (1 - alpha) * e )

and the bound is the mean over positions i of

    term_i = 1 + mean_{j != i} (s[i, i] - b[i, j]) - mean_{j != i} exp(s[i, j] - b[i, i]).

Limits (tested): alpha = 0 gives NWJ, term_i = s[i, i] - e^-1 mean_{j != i} exp(s[i, j]); alpha = 1 gives
InfoNCE over N - 1 candidates averaged over the held-out one, term_i = mean_{j != i} (s[i, i] -
log mean_{l != j} exp(s[i, l])) (the marginal term is then exactly 1).

What is ours, not the paper's (Distiller's text and code were not available to us; this is our reading):
- Positions of one chunk are the samples: position i's teacher is the positive of position i's student, the
  other distilled positions of the chunk are its negatives (Distiller contrasts the examples of a batch).
- The critic has no parameters: f(student_j, teacher_i) = sum_v p_i(v) log q_j(v), the expected log-likelihood
  the student at j gives a token drawn from the teacher at i (Poole et al.'s structured critic log p(y|x)).
  Its positive term is minus the cross-entropy, so alpha = 0 pulls the student towards forward KL.
- The fixed baseline is NWJ's constant e; the default alpha is 0.5 (we could not read the paper's default).
- Both distributions are tempered by T and the loss is -term_i * T**2 (the kdzoo convention of the other logit
  losses).  The value is minus a bound on MI: it can be negative.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...registry import Positive, UnitInterval, register_lm_loss
from .objectives import LMContext, TeacherChunk, TokenObjective

NWJ_LOG_BASELINE = 1.0  # log e: NWJ's constant baseline, the alpha = 0 end


def mi_alpha_scores(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
                    ) -> torch.Tensor:
    """(N, N) critic scores s[i, j] = sum_v p_i(v) log q_j(v): teacher i's tempered distribution p_i against
    student j's tempered log-probabilities (the teacher is a fixed target: no gradient reaches it)."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"mi_alpha: student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} must both be (N, V) with the same vocabulary")
    if temperature <= 0:
        raise ConfigError(f"mi_alpha: temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return p @ log_q.T


def leave_one_out_log_mean_exp(scores: torch.Tensor) -> torch.Tensor:
    """out[i, j] = log mean_{l != j} exp(scores[i, l]), to a few float eps, in O(N^2).  Shifted by the row maximum,
    a sum that leaves out a term other than the maximum still holds the maximum's exp(0) = 1 while the term is <= 1,
    so the subtraction cannot cancel; the maximum's own column is the log-sum-exp of the row without it."""
    n = scores.shape[1]
    top, where = scores.detach().max(dim=1, keepdim=True)  # any constant shift is exact: no gradient needed
    shifted = torch.exp(scores - top)
    without_term = torch.log((shifted.sum(1, keepdim=True) - shifted).clamp_min(1e-30)) + top
    is_top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, where, True)
    without_top = torch.logsumexp(scores.masked_fill(is_top, -math.inf), dim=1, keepdim=True)
    return torch.where(is_top, without_top, without_term) - math.log(n - 1)


def _log_mix(log_a: torch.Tensor, log_b: float, alpha: float) -> torch.Tensor:
    """log(alpha * exp(log_a) + (1 - alpha) * exp(log_b)), with the ends alpha = 0 and 1 exact."""
    if alpha == 1.0:
        return log_a
    if alpha == 0.0:
        return torch.full_like(log_a, log_b)
    return torch.logaddexp(log_a + math.log(alpha), torch.full_like(log_a, log_b + math.log1p(-alpha)))


def mi_alpha_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float,
                       temperature: float = 1.0) -> torch.Tensor:
    """(N,) loss: minus position i's share of the MI-alpha bound over the N positions given (see the module
    docstring), times T**2; the mean over positions is -I_alpha.  Fewer than two positions have no negatives: 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"mi_alpha: alpha must lie in [0, 1], got {alpha}")
    scores = mi_alpha_scores(student_logits, teacher_logits, temperature)
    n = scores.shape[0]
    if n < 2:
        return student_logits.float().sum(-1) * 0.0  # keeps the graph: a step with one position still runs
    baseline = _log_mix(leave_one_out_log_mean_exp(scores), NWJ_LOG_BASELINE, alpha)  # b[i, j]
    off = ~torch.eye(n, dtype=torch.bool, device=scores.device)
    positive = scores.diagonal()
    joint = ((positive[:, None] - baseline) * off).sum(1) / (n - 1)
    marginal = (torch.exp(scores - baseline.diagonal()[:, None]) * off).sum(1) / (n - 1)
    return -(1.0 + joint - marginal) * temperature ** 2


@register_lm_loss("mi_alpha", family="logit",
                  paper="He et al. 2021, Distiller (MI-alpha); Poole et al. 2019, On Variational Bounds of MI",
                  scope="our reading: Distiller's text and code were not available; Poole et al.'s interpolated "
                        "bound I_alpha (alpha 0: NWJ, 1: InfoNCE) with a parameter-free critic (teacher probabilities "
                        "against student log-probabilities); the other distilled positions of a batch (of a chunk, "
                        "when the losses are chunked) are the negatives; default alpha 0.5 is ours")
class MIAlpha(TokenObjective):
    """Maximise the MI-alpha bound between the teacher's and the student's next-token distributions, the other
    distilled positions of a chunk serving as negatives (dense teacher logits only: it scores every pair).

    Options:
      weight: multiplies the loss
      alpha: 0 = NWJ bound (low bias, high variance) .. 1 = InfoNCE (low variance, high bias)
      temperature: softens both distributions; the loss is scaled by temperature**2
    """

    works_offline: ClassVar[bool] = False  # the critic needs the teacher's whole distribution at every position

    def __init__(self, weight: float = 1.0, alpha: UnitInterval = 0.5, temperature: Positive = 1.0,
                 student_config=None, teacher_config=None):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"mi_alpha: alpha must lie in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ConfigError(f"mi_alpha: temperature must be > 0, got {temperature}")
        self.weight, self.alpha, self.temperature = weight, float(alpha), float(temperature)

    def per_token(self, student_logits: torch.Tensor, teacher: TeacherChunk) -> torch.Tensor:
        if teacher.logits is None:
            raise ConfigError("mi_alpha: needs the teacher's dense logits (an online teacher, offline.enabled=false)")
        return mi_alpha_per_token(student_logits, teacher.logits, self.alpha, self.temperature)

    def forward(self, ctx: LMContext) -> torch.Tensor:
        """Unchunked path: only the distilled positions enter (padding and prompt tokens must not be negatives)."""
        vocab = ctx.student_logits.shape[-1]
        index = ctx.mask.reshape(-1).nonzero().squeeze(1)
        student = ctx.student_logits.float().reshape(-1, vocab)[index]
        per_position = self.per_token(student, TeacherChunk.from_context(ctx).select(index))
        return self.weight * per_position.mean() if len(index) else ctx.student_logits.sum() * 0.0


__all__ = ["mi_alpha_per_token", "mi_alpha_scores", "leave_one_out_log_mean_exp", "MIAlpha"]
