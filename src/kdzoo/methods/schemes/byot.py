"""Be Your Own Teacher: Zhang et al. 2019, "Be Your Own Teacher: Improve the Performance of Convolutional Neural
Networks via Self Distillation" (the layered self-distillation the seed papers build on).

Auxiliary heads on the student's intermediate stages each learn from the labels, from the deepest classifier's
softened output and from its penultimate feature; no teacher is needed.  The heads belong to this method, not
to the student, so the exported student is the plain model.  Loss and defaults follow
luanyunteng/pytorch-be-your-own-teacher ``train.py``:

    (1 - alpha) * (CE(deepest) + sum_i CE(head_i)) + alpha * T^2 * sum_i CE_soft(head_i / T, softmax(deepest / T))
    + beta * sum_i sum((f_i - f_deep)^2 * [f_i > 0 or f_deep > 0])

with alpha 0.1, beta 1e-6, T 3 (its argparse defaults); the deepest output and feature are constants (detached).
The CE of the deepest classifier is the Distiller's cross-entropy (``ce_weight`` 0.9 = 1 - alpha).  Each head is
the reference's bottleneck idea made shape-generic: a 1x1 conv to the deepest feature's width, BatchNorm, ReLU,
global average pooling (tokens are first laid out on their patch grid), then a linear classifier.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import NonNegative, Positive, UnitInterval, register_method
from ..base import Context, Method, Setup

__all__ = ["byot_soft_loss", "masked_feature_loss", "AuxiliaryHead", "BYOT"]


def byot_soft_loss(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of softmax(logits / T) against softmax(target / T) (a constant), batch mean, times T^2."""
    target = F.softmax(target_logits.detach() / temperature, dim=1)
    return -(target * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean() * temperature ** 2


def masked_feature_loss(feature: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared differences summed where either value is positive (the reference's feature_loss_function)."""
    target = target.detach()
    return ((feature - target) ** 2 * ((feature > 0) | (target > 0)).float()).sum()


class AuxiliaryHead(nn.Module):
    """Bottleneck (1x1 conv + BN + ReLU + global pool) to `width` features, then a linear classifier."""

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.bottleneck = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.bottleneck(feature_map)
        return feature, self.classifier(feature)


@register_method("byot", family="scheme", description="stage heads learn from the deepest (no teacher)",
                 layers="every stage between the stem and the last, plus penultimate",
                 paper="Zhang et al. 2019, Be Your Own Teacher (self-distillation)")
class BYOT(Method):
    """``student_layers``: the intermediate taps that get heads (default: every stage between the stem and the
    last); the deepest feature is the student's ``penultimate`` tap, the deepest output its logits.

    Options:
        alpha: weight of the heads' soft targets from the deepest output (1 - alpha: of the labels)
        beta: multiplier of the feature hint pulling each head's feature toward the deepest feature
        temperature: softmax temperature of the soft target
        student_layers: the intermediate taps that get heads; null: every stage between the stem and the last
    """

    reads_labels = True
    ce_weight = 0.9
    needs_teacher = False

    def __init__(self, alpha: UnitInterval = 0.1, beta: NonNegative = 1e-6, temperature: Positive = 3.0,
                 student_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.student_layers = tuple(student_layers or ())
        self.student_taps = (*self.student_layers, "penultimate") if self.student_layers else ()

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.layout = student_layout
        if not self.student_layers:
            inner = [f"stage:{i}" for i in range(1, len(student_layout.stages) - 1)]
            if not inner:
                raise ConfigError(f"byot: the student has {len(student_layout.stages)} stages, none between the stem "
                                  "and the last; name student_layers")
            self.student_layers = tuple(inner)
        self.student_taps = (*self.student_layers, "penultimate")

    def build(self, setup: Setup) -> None:
        deepest = setup.student_shapes["penultimate"]
        if len(deepest) != 2:
            raise ConfigError(f"byot: the student's penultimate feature is {list(deepest)}, not a (B, D) vector")
        heads = []
        for spec in self.student_layers:
            channels = self.layout.map_shape(setup.student_shapes[spec])[1]
            heads.append(AuxiliaryHead(channels, deepest[1], setup.num_classes))
        self.heads = nn.ModuleList(heads)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        deepest_logits = ctx.student_logits.detach()
        deepest_feature = ctx.student["penultimate"].detach()
        ce = soft = feat = 0.0
        for spec, head in zip(self.student_layers, self.heads):
            feature, logits = head(self.layout.feature_map(ctx.student[spec]))
            ce = ce + F.cross_entropy(logits, ctx.labels)
            soft = soft + byot_soft_loss(logits, deepest_logits, self.temperature)
            feat = feat + masked_feature_loss(feature, deepest_feature)
        return {"byot_ce": (1 - self.alpha) * ce, "byot_kd": self.alpha * soft, "byot_feature": self.beta * feat}
