"""Token losses a chunk of tokens at a time, from final hidden states through the LM head: no (batch, seq, vocab)
tensor is ever made.

With vocabularies of 128k-262k entries the logits, their softmaxes and their gradients dominate a distillation
step's memory: (batch * seq) x vocab float32 values, several times over, for the student and the teacher.  Here
the student's and the teacher's final hidden states (batch * seq x width, small) go through their LM heads
`chunk_tokens` positions at a time; each chunk's losses are differentiated at once, in the forward pass, and
only the gradients with respect to the chunk's hidden states and the head's weights are kept (Liger-Kernel's
fused-linear losses do the same on GPU).  The gradients are exact: each chunk's loss is a sum of per-position
terms, so the total's gradient is the sum of the chunks'.  The head's matrix products run once forward and twice
for the gradients, as unchunked; peak memory holds a few (chunk_tokens x vocab) tensors.

Losses eligible: next-token cross-entropy and every `TokenObjective` without parameters of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .objectives import TeacherChunk, TokenObjective

__all__ = ["LMHead", "lm_head", "split_causal_lm", "auto_chunk_tokens", "chunked_token_losses", "ChunkedInputs",
           "liger_available", "liger_divergence"]

CHUNK_ELEMENTS = 1 << 24  # logits per chunk by default (64 MiB in float32): few passes over the head's gradient


@dataclass
class LMHead:
    """The linear map from final hidden states to logits: ``softcap * tanh(x W^T / softcap)`` when the model caps
    its logits (Gemma 2/3's final_logit_softcapping), ``x W^T + b`` otherwise."""

    weight: torch.Tensor  # (vocab, width)
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None

    def logits(self, hidden: torch.Tensor, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = F.linear(hidden, self.weight if weight is None else weight, self.bias if bias is None else bias)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def _inner_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a peft model: the transformers model it wraps
    return get_base() if callable(get_base) else model


def lm_head(model: nn.Module) -> LMHead:
    """The LM head of a transformers causal LM (its output embeddings, tied or not)."""
    inner = _inner_model(model)
    head = inner.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"{type(inner).__name__}: its output layer is a {type(head).__name__}, not a linear head; "
                          "set train.chunk_tokens=0 (unchunked losses)")
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    if getattr(inner.config, "logit_scale", None) not in (None, 1, 1.0):
        raise ConfigError(f"{type(inner).__name__}: scaled logits (logit_scale) are not supported chunked; set "
                          "train.chunk_tokens=0")
    return LMHead(head.weight, head.bias, float(softcap) if softcap else None)


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, LMHead]:
    """(the decoder that returns final hidden states, the LM head) of a transformers causal LM: the decoder is
    the model's ``base_model_prefix`` attribute (``model`` in Llama/Qwen/Gemma, ``transformer`` in GPT-2)."""
    inner = _inner_model(model)
    base = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    if not isinstance(base, nn.Module) or base is inner:
        raise ConfigError(f"{type(inner).__name__}: no decoder found under base_model_prefix; set train.chunk_tokens=0")
    return base, lm_head(inner)


def auto_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk so that a chunk's logits hold about CHUNK_ELEMENTS values (a power of two, >= 16)."""
    return max(16, 1 << int(math.floor(math.log2(max(CHUNK_ELEMENTS // max(vocab_size, 1), 1)))))


@dataclass
class ChunkedInputs:
    """One micro-batch's distilled positions, flattened: N rows (positions whose losses count)."""

    hidden: torch.Tensor  # (N, width) the student's final hidden states, with grad
    head: LMHead  # the student's head (its parameters get gradients)
    targets: torch.Tensor  # (N,) next tokens, for cross-entropy
    ce_weights: torch.Tensor  # (N,) per-position weight of the cross-entropy (mask / count * ce_weight)
    kd_weights: torch.Tensor  # (N,) per-position weight of the token objectives (mask / count)
    teacher: Callable[[slice], TeacherChunk]  # the teacher at rows [slice]


def _chunk_losses(logits: torch.Tensor, inputs: ChunkedInputs, rows: slice, objectives, with_ce: bool
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One chunk: each loss's weighted sum over its positions, and the gradient of their total with respect to
    the chunk's (float32) logits.  Closed-form gradients where the objective gives them, autograd otherwise."""
    parts, grad = [], None

    def accumulate(term: torch.Tensor) -> None:
        nonlocal grad
        grad = term if grad is None else grad.add_(term)

    if with_ce:
        weights = inputs.ce_weights[rows]
        log_q = logits.log_softmax(-1)
        parts.append(-(log_q.gather(-1, inputs.targets[rows, None]).squeeze(-1) * weights).sum())
        ce_grad = log_q.exp_().mul_(weights[:, None])  # softmax - one-hot, scaled; log_q is not needed again
        accumulate(ce_grad.scatter_add_(-1, inputs.targets[rows, None], -weights[:, None]))
    if objectives:
        teacher, kd_weights = inputs.teacher(rows), inputs.kd_weights[rows]
        autograd_parts = []
        leaf = logits.detach().requires_grad_(True)
        for _, objective in objectives:
            scale = objective.weight * kd_weights
            closed = getattr(objective, "per_token_and_grad", lambda *a: None)(logits, teacher)
            if closed is not None:
                parts.append((closed[0] * scale).sum())
                accumulate(closed[1].mul_(scale[:, None]))
            else:
                with torch.enable_grad():
                    autograd_parts.append((objective.per_token(leaf, teacher) * scale).sum())
                parts.append(autograd_parts[-1].detach())
        if autograd_parts:
            with torch.enable_grad():
                accumulate(torch.autograd.grad(torch.stack(autograd_parts).sum(), leaf)[0])
    if grad is None:
        grad = torch.zeros_like(logits)
    return parts, grad


class _ChunkedLosses(torch.autograd.Function):
    """Forward: every chunk's losses and their gradients; backward: the saved gradients times the incoming one.
    Returns (total, per-loss values); only the total is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs: ChunkedInputs, objectives, chunk_tokens: int):
        with_ce = bool(inputs.ce_weights.any())
        values = torch.zeros(int(with_ce) + len(objectives), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            chunk = hidden[rows]
            raw = F.linear(chunk, weight, bias)
            logits = raw.float()
            if inputs.head.softcap:
                logits = torch.tanh(logits / inputs.head.softcap) * inputs.head.softcap
            parts, grad = _chunk_losses(logits, inputs, rows, objectives, with_ce)
            if inputs.head.softcap:  # d(c tanh(x / c))/dx = 1 - tanh^2
                grad = grad * (1.0 - (logits / inputs.head.softcap).pow(2))
            grad = grad.to(raw.dtype)
            if grad_hidden.dtype == raw.dtype:
                torch.mm(grad, weight.to(raw.dtype), out=grad_hidden[rows])
            else:
                grad_hidden[rows] = grad @ weight.to(raw.dtype)
            if grad_weight.dtype == raw.dtype:
                grad_weight.addmm_(grad.t(), chunk.to(raw.dtype))
            else:  # bf16 autocast: products in bf16, the sum over chunks in the weight's float32
                grad_weight += (grad.t() @ chunk.to(raw.dtype)).to(grad_weight.dtype)
            if grad_bias is not None:
                grad_bias += grad.sum(0).to(grad_bias.dtype)
            values += torch.stack(parts)
        ctx.save_for_backward(grad_hidden, grad_weight, *([grad_bias] if grad_bias is not None else []))
        ctx.mark_non_differentiable(values)
        return values.sum(), values

    @staticmethod
    def backward(ctx, grad_total, grad_values):
        grad_hidden, grad_weight, *grad_bias = ctx.saved_tensors
        bias = grad_bias[0] * grad_total if grad_bias else None
        return grad_hidden * grad_total, grad_weight * grad_total, bias, None, None, None


def chunked_token_losses(inputs: ChunkedInputs, objectives: dict[str, TokenObjective],
                         chunk_tokens: int) -> dict[str, torch.Tensor]:
    """Cross-entropy (when any ce weight is set) and each objective's weighted loss, computed `chunk_tokens`
    positions at a time.  The returned values sum to the differentiable total: the first carries its gradient,
    the others are detached (so summing the dict, as the engine does, back-propagates the total once)."""
    for name, objective in objectives.items():
        if any(p.requires_grad for p in objective.parameters()):
            raise ConfigError(f"{name}: a loss with trainable parameters cannot be chunked; set train.chunk_tokens=0")
    pairs = list(objectives.items())
    total, values = _ChunkedLosses.apply(inputs.hidden, inputs.head.weight, inputs.head.bias, inputs, pairs,
                                         max(1, int(chunk_tokens)))
    names = (["ce"] if bool(inputs.ce_weights.any()) else []) + [name for name, _ in pairs]
    out = {name: values[i] for i, name in enumerate(names)}
    if names:
        out[names[0]] = values[0] + (total - total.detach())
    return out


# ---------------------------------------------------------------- Liger-Kernel (Triton, CUDA): the GPU anchor


def liger_available(device: torch.device) -> bool:
    """Whether Liger-Kernel's fused linear JSD can run here (installed, and a CUDA device)."""
    if device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: F401
    except ImportError:
        return False
    return True


def liger_divergence(objective: TokenObjective, student_hidden: torch.Tensor, student_head: LMHead,
                     teacher_hidden: torch.Tensor, teacher_head: LMHead) -> Optional[torch.Tensor]:
    """`objective`'s weighted loss over N positions (final hidden states of both models, rows already selected)
    through Liger's fused linear generalized JSD, or None when Liger cannot compute it exactly (not a dense
    forward/reverse KL or JSD, capped logits, biased heads).  Liger's JSD is GKD's (beta on the teacher; 0 forward
    KL, 1 reverse KL), averaged over the N rows; it divides both logits by T but does not multiply by T**2, which
    is done here like every kdzoo logit loss."""
    kind = getattr(objective, "kind", None)
    if kind not in ("forward_kl", "reverse_kl", "jsd") or student_head.softcap or teacher_head.softcap:
        return None
    if student_head.bias is not None or teacher_head.bias is not None:
        return None
    from liger_kernel.transformers import LigerFusedLinearJSD

    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, objective.beta())
    t = objective.temperature
    loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=t)
    value = loss(student_hidden, student_head.weight, teacher_hidden.detach(), teacher_head.weight.detach())
    return objective.weight * value.float() * t ** 2
