"""What a distilled LM is judged by: held-out perplexity, token-level KL to the teacher, top-1 agreement."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .chunked import split_causal_lm
from .data import TokenRows, loss_mask
from .losses import token_divergence

__all__ = ["evaluate_lm", "next_token_ce"]


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over counted positions, their count)."""
    per_position = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(),
                                   reduction="none").view(input_ids.shape[0], -1)
    m = mask[:, :-1].to(per_position.dtype)
    return (per_position * m).sum(), m.sum()


def _counted_logits(model: nn.Module, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor,
                    chunk_tokens: int) -> Iterator[torch.Tensor]:
    """The float32 logits at the counted positions of a batch: all at once, or `chunk_tokens` at a time from the
    final hidden states (the chunked path: no (batch, seq, vocab) tensor)."""
    if not chunk_tokens:
        yield model(input_ids=ids, attention_mask=attention.long()).logits[mask].float()
        return
    decoder, head = split_causal_lm(model)
    hidden = decoder(input_ids=ids, attention_mask=attention.long()).last_hidden_state[mask]
    for start in range(0, hidden.shape[0], chunk_tokens):
        yield head.logits(hidden[start:start + chunk_tokens]).float()


@torch.no_grad()
def evaluate_lm(model: nn.Module, rows: TokenRows, teacher: Optional[nn.Module] = None, batch_size: int = 16,
                max_batches: int = 0, device: Optional[torch.device] = None, prompt_len: int = 0,
                chunk_tokens: int = 0) -> dict[str, float]:
    """Perplexity of `model` on `rows` (exp of the mean next-token cross-entropy over counted tokens) and, with a
    teacher, the mean KL(teacher || model) per token and how often both pick the same most likely token.
    `chunk_tokens` > 0 goes through the LM heads that many positions at a time."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = count = 0.0
    for b, lo in enumerate(range(0, len(rows), batch_size)):
        if max_batches and b >= max_batches:
            break
        ids = rows.input_ids[lo:lo + batch_size].to(device)
        attention = rows.attention_mask[lo:lo + batch_size].to(device)
        mask = loss_mask(attention, prompt_len)
        targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[mask]
        teacher_chunks = (_counted_logits(teacher, ids, attention, mask, chunk_tokens) if teacher is not None
                          else None)
        offset = 0
        for logits in _counted_logits(model, ids, attention, mask, chunk_tokens):
            n = logits.shape[0]
            ce_sum += F.cross_entropy(logits, targets[offset:offset + n], reduction="sum").item()
            offset += n
            if teacher_chunks is not None:
                teacher_logits = next(teacher_chunks)
                kl_sum += token_divergence("forward_kl", teacher_logits.log_softmax(-1), logits.log_softmax(-1)).sum().item()
                agree += (teacher_logits.argmax(-1) == logits.argmax(-1)).sum().item()
        count += offset
    model.train(was_training)
    count = max(count, 1.0)
    out = {"loss": ce_sum / count, "ppl": math.exp(min(ce_sum / count, 50.0)), "tokens": int(count)}
    if teacher is not None:
        out.update(kl=kl_sum / count, top1_agreement=agree / count)
    return out
