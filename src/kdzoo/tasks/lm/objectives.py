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
from torch import nn

from ...errors import ConfigError
from ...registry import LM_LOSSES, register_lm_loss
from . import alignment, losses


@dataclass
class SparseTeacher:
    """The offline cache's view of the teacher at each position: top-k tempered logits and their log-sum-exp."""

    indices: torch.Tensor  # (batch, seq, k)
    logits: torch.Tensor  # (batch, seq, k), teacher logits / temperature
    logsumexp: torch.Tensor  # (batch, seq), over the whole vocabulary


@dataclass
class LMContext:
    student_logits: torch.Tensor  # (batch, seq, vocab)
    mask: torch.Tensor  # (batch, seq) bool: positions whose next-token distribution is distilled
    attention_mask: torch.Tensor  # (batch, seq): real tokens
    teacher_logits: Optional[torch.Tensor] = None
    sparse_teacher: Optional[SparseTeacher] = None
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


class _Divergence(LMObjective):
    kind: ClassVar[str] = ""

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, student_config=None, teacher_config=None):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"{self.kind}: temperature must be > 0, got {temperature}")
        self.weight, self.temperature = weight, temperature

    def beta(self) -> float:
        return 0.5

    def forward(self, ctx: LMContext) -> torch.Tensor:
        kinds = {"forward_kl": (losses.forward_kl_loss, losses.sparse_forward_kl_loss),
                 "reverse_kl": (losses.reverse_kl_loss, losses.sparse_reverse_kl_loss),
                 "tvd": (losses.total_variation_loss, losses.sparse_total_variation_loss)}
        extra = {}
        if self.kind == "jsd":
            dense, sparse = losses.generalized_jsd_loss, losses.sparse_generalized_jsd_loss
            extra = {"beta": self.beta()}
        else:
            dense, sparse = kinds[self.kind]
        if ctx.teacher_logits is not None:
            value = dense(ctx.student_logits, ctx.teacher_logits, ctx.mask, temperature=self.temperature, **extra)
        elif ctx.sparse_teacher is not None:
            t = ctx.sparse_teacher
            value = sparse(ctx.student_logits, t.indices, t.logits, t.logsumexp, ctx.mask,
                           temperature=self.temperature, **extra)
        else:
            raise ConfigError(f"{self.kind}: no teacher logits in this batch")
        return self.weight * value


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
        total = ctx.student_logits.new_zeros(())
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
        total = ctx.student_logits.new_zeros(())
        if self.attention_weight:
            total = total + self.attention_weight * alignment.attention_kl_loss(
                ctx.student_attentions[self.student_layer], ctx.teacher_attentions[self.teacher_layer],
                ctx.attention_mask)
        if self.value_weight:
            total = total + self.value_weight * alignment.value_relation_loss(
                ctx.student_values[self.student_layer], ctx.teacher_values[self.teacher_layer],
                self.relation_heads, ctx.attention_mask)
        return self.weight * total


def create_lm_loss(name: str, student_config: Any = None, teacher_config: Any = None, **options: Any) -> LMObjective:
    return LM_LOSSES.build(name, student_config=student_config, teacher_config=teacher_config, **options)


__all__ = ["LM_LOSSES", "register_lm_loss", "create_lm_loss", "LMContext", "SparseTeacher", "LMObjective"]
