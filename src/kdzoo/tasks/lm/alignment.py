"""Hidden-state and attention alignment between a student and a teacher transformer, as pure functions.

- Hidden states: MSE or cosine distance between chosen student and teacher layers (after the student's
  learned projection to the teacher's width), averaged over real (non-padding) tokens.  Which layers meet is
  a layer map: ``uniform`` (student layer i of Ls meets teacher layer round(i*Lt/Ls), the DistilBERT/TinyBERT
  "every k-th layer" rule), ``last`` (last with last), or explicit ``[[student, teacher], ...]`` pairs.
  Indices count hidden states as transformers returns them: 0 is the embedding output, i the output of
  layer i.
- MiniLM (Wang et al., 2020): KL between the teacher's and the student's self-attention distributions of
  one layer (per head, per query; needs the same number of heads), and KL between their value relations
  ``softmax(V V^T / sqrt(d))`` per relation head.  The value vectors are split into ``relation_heads`` heads
  on both sides (as MiniLMv2 does), so the head counts of the two models need not agree for this part.  For
  a causal LM a query may only relate to itself and earlier tokens, so the value relation gets the causal
  and padding masks the attention itself has (MiniLM was written for bidirectional encoders).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from .losses import masked_mean

__all__ = ["layer_map", "hidden_mse_loss", "hidden_cosine_loss", "attention_kl_loss", "value_relation_loss",
           "value_relations"]


def layer_map(num_student_layers: int, num_teacher_layers: int, kind: str | Sequence = "uniform") -> list[tuple[int, int]]:
    """(student, teacher) hidden-state index pairs; 0 is the embedding output, L the last layer."""
    if isinstance(kind, str):
        if kind == "last":
            return [(num_student_layers, num_teacher_layers)]
        if kind == "uniform":
            return [(i, round(i * num_teacher_layers / num_student_layers)) for i in range(1, num_student_layers + 1)]
        raise ConfigError(f"layer_map: {kind!r} is not one of uniform, last, or a list of [student, teacher] pairs")
    pairs = []
    for item in kind:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, int) for v in item)):
            raise ConfigError(f"layer_map: expected [student, teacher] integer pairs, got {item!r}")
        s, t = item
        if not (0 <= s <= num_student_layers and 0 <= t <= num_teacher_layers):
            raise ConfigError(f"layer_map: pair {[s, t]} out of range (student 0..{num_student_layers}, "
                              f"teacher 0..{num_teacher_layers}; 0 is the embedding output)")
        pairs.append((s, t))
    if not pairs:
        raise ConfigError("layer_map: the list of pairs is empty")
    return pairs


def hidden_mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens of the mean squared difference over features; (batch, seq, dim) each."""
    _same_shape(student_hidden, teacher_hidden, "hidden states")
    return masked_mean((student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1), mask)


def hidden_cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens of 1 - cos(student, teacher)."""
    _same_shape(student_hidden, teacher_hidden, "hidden states")
    return masked_mean(1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1), mask)


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student {tuple(a.shape)} and teacher {tuple(b.shape)} differ")


def _row_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p||q) over the last dimension of probability tensors; 0 where p = 0."""
    log_ratio = torch.where(p > 0, p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log(), torch.zeros_like(p))
    return (p * log_ratio).sum(-1)


def attention_kl_loss(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MiniLM's attention transfer: KL(teacher || student) of each head's attention row, averaged over heads
    and real query tokens.  Attention tensors are (batch, heads, query, key) probabilities."""
    if student_attention.shape != teacher_attention.shape:
        raise ConfigError(f"minilm: attention maps differ in shape (student {tuple(student_attention.shape)}, "
                          f"teacher {tuple(teacher_attention.shape)}): attention transfer needs the same number of "
                          "heads; set attention_weight=0 to use value relations alone")
    per_query = _row_kl(teacher_attention.float(), student_attention.float()).mean(1)  # (batch, query)
    return masked_mean(per_query, mask)


def value_relations(values: torch.Tensor, heads: int, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(V V^T / sqrt(d)) per relation head with causal and padding masks: (batch, heads, seq, seq)."""
    batch, seq, width = values.shape
    if width % heads:
        raise ConfigError(f"minilm: value width {width} does not split into relation_heads={heads}")
    v = values.float().view(batch, seq, heads, width // heads).transpose(1, 2)
    scores = v @ v.transpose(-1, -2) / math.sqrt(width // heads)
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=values.device).tril()
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        # a padding query (left padding) keeps itself, so no row is empty; such rows are masked out later
        allowed = allowed | torch.eye(seq, dtype=torch.bool, device=values.device)
    return scores.masked_fill(~allowed, -math.inf).softmax(-1)


def value_relation_loss(student_values: torch.Tensor, teacher_values: torch.Tensor, heads: int,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MiniLM's value-relation transfer: KL(teacher || student) of the value relations, (batch, seq, width) each
    (the widths may differ; both split into `heads` heads)."""
    student_rel = value_relations(student_values, heads, mask)
    teacher_rel = value_relations(teacher_values, heads, mask)
    return masked_mean(_row_kl(teacher_rel, student_rel).mean(1), mask)
