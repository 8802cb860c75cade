"""LM distillation losses registered by name: thin modules over the pure functions in `losses` and `alignment`.

A config lists them (``losses: [forward_kl, {name: hidden, loss: cosine}]``); each holds its options and any
learned part (the hidden-state projections) and returns its weighted loss from an `LMContext`.  The logit
losses read dense teacher logits when the teacher runs online and the sparse top-k view when it comes from
the offline cache, so one config serves both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import LM_LOSSES, register_lm_loss
from . import alignment, losses
from .sampled import sampled_kl_per_token


@dataclass
class SparseTeacher:
    """The offline cache's view of the teacher at each position: top-k tempered logits and their log-sum-exp."""

    indices: torch.Tensor  # (batch, seq, k)
    logits: torch.Tensor  # (batch, seq, k), teacher logits / temperature
    logsumexp: torch.Tensor  # (batch, seq), over the whole vocabulary


@dataclass
class SampledTeacher:
    """Random-sampling KD's view of the teacher (Anshumann et al. 2025): tokens drawn from the teacher's tempered
    distribution and their weights, an unbiased estimate of its probabilities (>= 0, summing to 1; 0 in unused slots)."""

    indices: torch.Tensor  # (..., k)
    weights: torch.Tensor  # (..., k)


@dataclass
class TeacherChunk:
    """The teacher at N distilled positions, in whichever form this run has it."""

    logits: Optional[torch.Tensor] = None  # (N, V_teacher) raw logits
    sparse: Optional[SparseTeacher] = None  # fields (N, k)
    sampled: Optional[SampledTeacher] = None  # fields (N, k)

    @classmethod
    def from_context(cls, ctx: "LMContext") -> "TeacherChunk":
        """A whole (batch, seq) context's teacher, flattened to (batch * seq, ...)."""
        flat = lambda x: None if x is None else x.reshape(-1, *x.shape[2:])  # noqa: E731
        sparse = ctx.sparse_teacher
        if sparse is not None:
            sparse = SparseTeacher(flat(sparse.indices), flat(sparse.logits), flat(sparse.logsumexp))
        sampled = ctx.sampled_teacher
        if sampled is not None:
            sampled = SampledTeacher(flat(sampled.indices), flat(sampled.weights))
        return cls(flat(ctx.teacher_logits), sparse, sampled)

    def select(self, index: torch.Tensor) -> "TeacherChunk":
        """The rows `index` of every part."""
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        sparse = self.sparse and SparseTeacher(pick(self.sparse.indices), pick(self.sparse.logits),
                                               pick(self.sparse.logsumexp))
        sampled = self.sampled and SampledTeacher(pick(self.sampled.indices), pick(self.sampled.weights))
        return TeacherChunk(pick(self.logits), sparse, sampled)


@dataclass
class LMContext:
    student_logits: torch.Tensor  # (batch, seq, vocab)
    mask: torch.Tensor  # (batch, seq) bool: positions whose next-token distribution is distilled
    attention_mask: torch.Tensor  # (batch, seq): real tokens
    teacher_logits: Optional[torch.Tensor] = None
    sparse_teacher: Optional[SparseTeacher] = None
    sampled_teacher: Optional[SampledTeacher] = None
    student_hidden: Optional[tuple[torch.Tensor, ...]] = None  # transformers' hidden_states: embeddings, layer 1..L
    teacher_hidden: Optional[tuple[torch.Tensor, ...]] = None
    student_attentions: Optional[tuple[torch.Tensor, ...]] = None
    teacher_attentions: Optional[tuple[torch.Tensor, ...]] = None
    student_values: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> value vectors
    teacher_values: dict[int, torch.Tensor] = field(default_factory=dict)


class LMObjective(nn.Module):
    """Base class: what a loss needs from the forward passes, and `forward(ctx) -> weighted loss`."""

    needs_hidden: ClassVar[bool] = False
    needs_attentions: ClassVar[bool] = False
    works_offline: ClassVar[bool] = True  # only logit losses can read the offline cache

    def value_layers(self) -> tuple[list[int], list[int]]:
        """Layers (0-based) whose attention value vectors the student and the teacher must expose."""
        return [], []

    @classmethod
    def wants_attentions(cls, options: dict) -> bool:
        """Whether these options need attention maps (known before the models are built: eager attention)."""
        return cls.needs_attentions


def _num_layers(config: Any) -> int:
    return int(config.num_hidden_layers)


class TokenObjective(LMObjective):
    """A loss that is ``weight`` times the mean, over distilled positions, of a per-position term of the student's
    logits and the teacher's view at that position (`per_token`).  Written per position so the engine can feed it
    a chunk of tokens at a time (`kdzoo.tasks.lm.chunked`): no (batch, seq, vocab) tensor is needed."""

    cross_tokenizer: ClassVar[bool] = False  # True: __init__ also receives student_tokenizer=, teacher_tokenizer=
    weight: float = 1.0

    def per_token(self, student_logits: torch.Tensor, teacher: TeacherChunk) -> torch.Tensor:
        """(N, V) float32 student logits -> (N,) per-position loss (temperature scaling in, `weight` out)."""
        raise NotImplementedError

    def forward(self, ctx: LMContext) -> torch.Tensor:
        """The whole batch as one chunk: the unchunked path, over full (batch, seq, vocab) logits."""
        teacher = TeacherChunk.from_context(ctx)
        vocab = ctx.student_logits.shape[-1]
        per_position = self.per_token(ctx.student_logits.float().reshape(-1, vocab), teacher)
        return self.weight * losses.masked_mean(per_position.view(ctx.mask.shape), ctx.mask)


class _Divergence(TokenObjective):
    kind: ClassVar[str] = ""

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, student_config=None, teacher_config=None):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"{self.kind}: temperature must be > 0, got {temperature}")
        self.weight, self.temperature = weight, temperature

    def beta(self) -> float:
        return 0.5

    def per_token(self, student_logits: torch.Tensor, teacher: TeacherChunk) -> torch.Tensor:
        t = self.temperature
        if teacher.logits is not None:
            if teacher.logits.shape != student_logits.shape:
                raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                                 f"{tuple(teacher.logits.shape)} differ (same tokenizer and vocabulary size needed; "
                                 "losses uld or gold distil across tokenizers)")
            log_q = F.log_softmax(student_logits.float() / t, dim=-1)
            log_p = F.log_softmax(teacher.logits.detach().float() / t, dim=-1)  # the teacher is a fixed target
        elif teacher.sparse is not None:
            s = teacher.sparse
            log_p, log_q = losses.sparse_log_probs(student_logits, s.indices, s.logits, s.logsumexp, t)
        elif teacher.sampled is not None:
            if self.kind != "forward_kl":
                raise ConfigError(f"{self.kind}: a sampled teacher cache (offline.mode=sample) estimates the forward "
                                  "KL only; use forward_kl or offline.mode=topk")
            return sampled_kl_per_token(student_logits, teacher.sampled.indices, teacher.sampled.weights, t)
        else:
            raise ConfigError(f"{self.kind}: no teacher logits in this batch")
        return losses.token_divergence(self.kind, log_p, log_q, self.beta()) * t ** 2

    def per_token_and_grad(self, student_logits: torch.Tensor, teacher: TeacherChunk
                           ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(per-position loss, its gradient with respect to `student_logits`) in closed form, for the chunked
        path's speed: forward KL T^2 KL(p||q) has gradient T (q - p); reverse KL T^2 KL(q||p) has gradient
        T q (log q - log p - KL(q||p)).  None where no closed form is written (autograd is used then)."""
        kind = {"jsd": {0.0: "forward_kl", 1.0: "reverse_kl"}.get(self.beta())}.get(self.kind, self.kind)
        if teacher.logits is None or kind not in ("forward_kl", "reverse_kl"):
            return None
        t = self.temperature
        scaled = (lambda x: x.float()) if t == 1.0 else (lambda x: x.float() / t)  # noqa: E731
        log_q = F.log_softmax(scaled(student_logits), dim=-1)
        log_p = F.log_softmax(scaled(teacher.logits), dim=-1)
        if kind == "forward_kl":  # in place where it is safe: these are chunk-sized (tokens x vocab) tensors
            p = log_p.exp()
            loss = (p * log_p.sub_(log_q)).sum(-1) * t ** 2
            return loss, log_q.exp_().sub_(p).mul_(t)
        q = log_q.exp()
        log_ratio = log_q.sub_(log_p)
        kl = (q * log_ratio).sum(-1, keepdim=True)
        return kl.squeeze(-1) * t ** 2, q * (log_ratio - kl) * t


@register_lm_loss("forward_kl", family="logit", paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network")
class ForwardKL(_Divergence):
    kind = "forward_kl"


@register_lm_loss("reverse_kl", family="logit", paper="Gu et al. 2024, MiniLLM: Knowledge Distillation of LLMs")
class ReverseKL(_Divergence):
    kind = "reverse_kl"


@register_lm_loss("jsd", family="logit", paper="Agarwal et al. 2024, On-Policy Distillation of LMs (GKD)")
class GeneralizedJSD(_Divergence):
    kind = "jsd"

    def __init__(self, weight: float = 1.0, beta: float = 0.5, temperature: float = 1.0, student_config=None,
                 teacher_config=None):
        super().__init__(weight, temperature)
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"jsd: beta must lie in [0, 1], got {beta}")
        self.beta_value = beta

    def beta(self) -> float:
        return self.beta_value


@register_lm_loss("tvd", family="logit", paper="Wen et al. 2023, f-Divergence Minimization for Sequence-Level KD")
class TotalVariation(_Divergence):
    kind = "tvd"


@register_lm_loss("hidden", family="feature", paper="Sanh et al. 2019 (DistilBERT), Jiao et al. 2020 (TinyBERT)")
class HiddenAlignment(LMObjective):
    """MSE or cosine between mapped hidden states; a learned linear projection lifts the student's width to the
    teacher's (always when `projection` is true, as TinyBERT does; otherwise only needed when widths differ)."""

    needs_hidden = True
    works_offline = False

    def __init__(self, weight: float = 1.0, loss: str = "mse", layer_map: Any = "uniform", projection: bool = True,
                 student_config=None, teacher_config=None):
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise ConfigError(f"hidden: loss {loss!r} is not one of mse, cosine")
        if student_config is None or teacher_config is None:
            raise ConfigError("hidden: needs the student's and the teacher's transformers configs")
        self.weight, self.loss = weight, loss
        self.pairs = alignment.layer_map(_num_layers(student_config), _num_layers(teacher_config), layer_map)
        ds, dt = int(student_config.hidden_size), int(teacher_config.hidden_size)
        if ds != dt and not projection:
            raise ConfigError(f"hidden: student width {ds} != teacher width {dt}: set projection=true")
        self.projections = nn.ModuleList(
            [nn.Linear(ds, dt, bias=False) if projection else nn.Identity() for _ in self.pairs])

    def forward(self, ctx: LMContext) -> torch.Tensor:
        fn = alignment.hidden_mse_loss if self.loss == "mse" else alignment.hidden_cosine_loss
        total = ctx.mask.new_zeros((), dtype=torch.float32)
        for (s, t), proj in zip(self.pairs, self.projections):
            total = total + fn(proj(ctx.student_hidden[s].float()), ctx.teacher_hidden[t].float(), ctx.attention_mask)
        return self.weight * total / len(self.pairs)


@register_lm_loss("minilm", family="attention", paper="Wang et al. 2020, MiniLM: Deep Self-Attention Distillation")
class MiniLM(LMObjective):
    """Self-attention distributions (same head count needed) and value relations of one layer each."""

    needs_attentions = True
    works_offline = False

    def __init__(self, weight: float = 1.0, attention_weight: float = 1.0, value_weight: float = 1.0,
                 relation_heads: Optional[int] = None, student_layer: int = -1, teacher_layer: int = -1,
                 student_config=None, teacher_config=None):
        super().__init__()
        if student_config is None or teacher_config is None:
            raise ConfigError("minilm: needs the student's and the teacher's transformers configs")
        self.weight, self.attention_weight, self.value_weight = weight, attention_weight, value_weight
        self.needs_attentions = bool(attention_weight)  # attention maps cost an eager attention pass
        ls, lt = _num_layers(student_config), _num_layers(teacher_config)
        for layer, count, side in ((student_layer, ls, "student"), (teacher_layer, lt, "teacher")):
            if not -count <= layer < count:
                raise ConfigError(f"minilm: {side}_layer {layer} out of range for {count} layers")
        self.student_layer, self.teacher_layer = student_layer % ls, teacher_layer % lt
        self.relation_heads = int(relation_heads or teacher_config.num_attention_heads)
        if attention_weight and student_config.num_attention_heads != teacher_config.num_attention_heads:
            raise ConfigError(f"minilm: attention transfer needs equal head counts (student "
                              f"{student_config.num_attention_heads}, teacher {teacher_config.num_attention_heads}); "
                              "set attention_weight=0 to use value relations alone")

    def value_layers(self) -> tuple[list[int], list[int]]:
        return ([self.student_layer], [self.teacher_layer]) if self.value_weight else ([], [])

    @classmethod
    def wants_attentions(cls, options: dict) -> bool:
        return bool(options.get("attention_weight", 1.0))

    def forward(self, ctx: LMContext) -> torch.Tensor:
        total = ctx.mask.new_zeros((), dtype=torch.float32)
        if self.attention_weight:
            total = total + self.attention_weight * alignment.attention_kl_loss(
                ctx.student_attentions[self.student_layer], ctx.teacher_attentions[self.teacher_layer],
                ctx.attention_mask)
        if self.value_weight:
            total = total + self.value_weight * alignment.value_relation_loss(
                ctx.student_values[self.student_layer], ctx.teacher_values[self.teacher_layer],
                self.relation_heads, ctx.attention_mask)
        return self.weight * total


def create_lm_loss(name: str, student_config: Any = None, teacher_config: Any = None, student_tokenizer: Any = None,
                   teacher_tokenizer: Any = None, **options: Any) -> LMObjective:
    """A registered LM loss; cross-tokenizer losses also get both tokenizers."""
    if getattr(LM_LOSSES.get(name).obj, "cross_tokenizer", False):
        options.update(student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer)
    return LM_LOSSES.build(name, student_config=student_config, teacher_config=teacher_config, **options)


__all__ = ["LM_LOSSES", "register_lm_loss", "create_lm_loss", "LMContext", "SparseTeacher", "SampledTeacher",
           "TeacherChunk", "LMObjective", "TokenObjective"]
