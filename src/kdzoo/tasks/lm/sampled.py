"""Random-sampling knowledge distillation (Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs") as pure functions: drawing the sparse teacher and the loss against it.

At each position, `samples` tokens are drawn with replacement from the teacher's tempered distribution p; the
distinct ids and their counts are kept.  ``p_hat(x) = count(x) / samples`` is an unbiased estimate of p(x)
(the counts are multinomial), so the gradient of the estimated forward KL

    KL(p_hat || q) = sum_x p_hat(x) log p_hat(x) - sum_x p_hat(x) log q(x),    q = softmax(student / T)

with respect to the student's logits, ``(q - p_hat) / T`` (times T**2 here), is an unbiased estimate of the dense
forward KL's gradient ``(q - p) / T``; top-k caching is biased instead (it drops the tail).  The first term does not
depend on the student: it only makes the value a divergence (0 when q = p_hat).

The proposal.  The paper derives the method as importance sampling: draw from a proposal distribution and weight
each draw by p / proposal.  Drawing from the teacher's own tempered distribution (proposal = p, i.e. a proposal
temperature equal to the distillation temperature) makes every weight 1, so the estimate is just count / samples,
exactly unbiased, and needs nothing but ids and small integer counts on disk; the paper reports full-KD quality
with about 12 distinct tokens per position.  That is the configuration implemented here.  Another proposal
temperature would need the weights p / proposal self-normalised over the draws, which is biased for a finite
number of draws, and is not offered.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...errors import ConfigError

__all__ = ["draw_teacher_samples", "pad_sampled", "sampled_kl_per_token"]


def draw_teacher_samples(log_probs: torch.Tensor, samples: int,
                         generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `samples` tokens with replacement at each of P positions from (P, V) log-probabilities.

    Returns the distinct ids of every position, ascending within a position and positions one after another
    (E,), how often each was drawn (E,), and how many distinct ids each position has (P,): a ragged layout
    that stores only what was drawn."""
    if log_probs.dim() != 2:
        raise ConfigError(f"sampled teacher: log-probabilities must be (positions, vocab), got {tuple(log_probs.shape)}")
    if samples < 1:
        raise ConfigError(f"offline.samples: must be >= 1, got {samples}")
    positions = log_probs.shape[0]
    draws = torch.multinomial(log_probs.float().exp(), samples, replacement=True, generator=generator)
    ordered = draws.sort(dim=-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)  # a new id starts here (each position's first draw does)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    starts = first.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([positions * samples])])
    return ordered.reshape(-1)[starts], ends - starts, first.sum(-1)


def pad_sampled(ids: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, samples: int,
                width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ragged layout of `draw_teacher_samples` as (P, width) indices (long) and weights count / samples
    (float32); slots past a position's distinct ids hold index 0 with weight 0."""
    lengths = lengths.long()
    positions = lengths.numel()
    width = int(lengths.max()) if width is None else width
    if positions and int(lengths.max()) > width:
        raise ConfigError(f"sampled teacher: a position has {int(lengths.max())} distinct ids, more than width {width}")
    if int(lengths.sum()) != ids.numel() or ids.numel() != counts.numel():
        raise ConfigError(f"sampled teacher: lengths sum to {int(lengths.sum())} but there are {ids.numel()} ids and "
                          f"{counts.numel()} counts")
    device = ids.device
    lengths = lengths.to(device)
    row = torch.repeat_interleave(torch.arange(positions, device=device), lengths)
    start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    slot = torch.arange(ids.numel(), device=device) - start
    indices = torch.zeros(positions, width, dtype=torch.long, device=device)
    weights = torch.zeros(positions, width, dtype=torch.float32, device=device)
    indices[row, slot] = ids.long()
    weights[row, slot] = counts.float() / samples
    return indices, weights


def sampled_kl_per_token(student_logits: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """(N, V) student logits, (N, k) sampled ids and their weights (>= 0, summing to 1; 0 in unused slots)
    -> (N,) KL(p_hat || softmax(student / T)) * T**2.  The weights are data: no gradient flows into them."""
    if student_logits.dim() != 2:
        raise ConfigError(f"sampled KL: student logits must be (N, vocab), got {tuple(student_logits.shape)}")
    if indices.shape != weights.shape or indices.dim() != 2 or indices.shape[0] != student_logits.shape[0]:
        raise ConfigError(f"sampled KL: indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must both be "
                          f"(N, k) with N = {student_logits.shape[0]} (the student's positions)")
    if temperature <= 0:
        raise ConfigError(f"sampled KL: temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices.long())
    w = weights.detach().float()
    used = w > 0  # unused slots contribute nothing, even where log q would be -inf
    value = torch.where(used, torch.xlogy(w, w) - w * log_q, torch.zeros_like(w)).sum(-1)
    return value * temperature ** 2
