"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019."""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from ...adapters import ConvAdapter, resize_like
from ...errors import ConfigError
from ...registry import NonNegative, register_method
from ...taps import get_module, split_tap, stage_taps
from ..base import Context, Method

MARGIN_SOURCES = ("auto", "last_bn", "empirical")


def check_margin_source(source: str) -> None:
    if source not in MARGIN_SOURCES:
        raise ConfigError(f"ofd: margin must be one of {', '.join(MARGIN_SOURCES)}, got {source!r}")


def gaussian_negative_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[x | x < 0] for x ~ N(mean, std^2), per channel.  Where fewer than 0.1% of values are negative the
    ratio is unstable and -3 std is used instead (the authors' and mdistiller's rule)."""
    std = std.abs().clamp_min(1e-12)
    z = mean / std
    negative_mass = torch.special.ndtr(-z)
    density = torch.exp(-z.pow(2) / 2) / math.sqrt(2 * math.pi)
    exact = mean - std * density / negative_mass.clamp_min(1e-3)
    return torch.where(negative_mass > 1e-3, exact, -3 * std)


def batchnorm_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The margin of a feature a BatchNorm produces: its output is ~ N(beta, gamma^2) per channel."""
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(bn.num_features)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(bn.num_features)
    return gaussian_negative_mean(beta.float(), gamma.float())


def empirical_margin(feature: torch.Tensor) -> torch.Tensor:
    """E[x | x < 0] per channel measured on a batch of feature maps (B, C, H, W); -3 std for a channel
    without negative values."""
    x = feature.detach().float().transpose(0, 1).flatten(1)
    negative = x < 0
    count = negative.sum(1)
    mean_negative = (x * negative).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, mean_negative, -3 * x.std(1, correction=0))


@torch.no_grad()
def teacher_margin(teacher: nn.Module, tap: str, example: torch.Tensor, source: str = "auto",
                   feature_shape: Optional[torch.Size] = None) -> torch.Tensor:
    """The per-channel margin of the teacher's pre-ReLU feature at module tap `tap`, shape (C,).

    One eval forward on `example` copies every BatchNorm2d output (only those of `feature_shape`, when
    known, to spare memory), in call order, and the feature itself (a tap's input is copied before its
    module runs, so an in-place ReLU cannot hide it).  With `source`:
      - "auto": the BN whose output *is* the feature (equal values) gives the closed form; if none does,
        e.g. a residual sum follows the last BN, the margin is measured on the feature (`empirical_margin`);
      - "last_bn": the last BN of the feature's shape called before the tap, even across a residual sum:
        the authors' and mdistiller's choice (``bn2`` of a stage's last block);
      - "empirical": always measured on the feature over `example`.
    """
    check_margin_source(source)
    path, want_input = split_tap(tap)
    module = get_module(teacher, path)
    seen: dict[str, object] = {}
    bn_outputs: list[tuple[nn.BatchNorm2d, torch.Tensor]] = []

    def record_feature(value: torch.Tensor) -> None:
        seen["feature"], seen["bn_calls"] = value.clone(), len(bn_outputs)

    def record_bn(bn, inputs, output) -> None:
        if feature_shape is None or output.shape == feature_shape:
            bn_outputs.append((bn, output.clone()))

    handles = [m.register_forward_hook(record_bn) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    if want_input:
        handles.append(module.register_forward_pre_hook(lambda m, inputs: record_feature(inputs[0])))
    else:
        handles.append(module.register_forward_hook(lambda m, inputs, output: record_feature(output)))
    was_training = teacher.training
    teacher.eval()
    try:
        teacher(example)
    finally:
        teacher.train(was_training)
        for handle in handles:
            handle.remove()
    if "feature" not in seen:
        raise ConfigError(f"ofd: the teacher never called {path!r}")
    feature, bn_calls = seen["feature"], seen["bn_calls"]
    candidates = [(bn, out) for bn, out in bn_outputs[:bn_calls] if out.shape == feature.shape]
    if source == "last_bn" and candidates:
        return batchnorm_margin(candidates[-1][0])
    if source == "auto":
        for bn, out in reversed(candidates):
            if torch.equal(out, feature):
                return batchnorm_margin(bn)
    return empirical_margin(feature)


def ofd_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 between the connected student feature and the teacher's pre-ReLU feature.

    The teacher's negative responses are first raised to the channel's margin (target = max(t, m));
    positions where the student is already at or below a non-positive target are skipped, as the ReLU
    would erase the difference.  Summed over channels and positions, averaged over the batch (mdistiller).
    """
    margin = margin.to(teacher_feature).view(1, -1, 1, 1)
    target = torch.maximum(teacher_feature, margin)
    counted = (student_feature > target) | (teacher_feature > 0)
    return ((student_feature - target).pow(2) * counted).sum() / student_feature.shape[0]


@register_method("ofd", family="feature", paper="Heo et al. 2019, A Comprehensive Overhaul of Feature Distillation")
class OFD(Method):
    """Per stage, a 1x1 conv + BN connector maps the student's pre-ReLU feature to the teacher's width; the
    teacher's pre-ReLU feature is average-pooled to the student's size.  As mdistiller: every stage after the
    stem, the deepest weighing 1 and each shallower one half the next, weight 0.001.

    Taps: the "preact" list the model family publishes; models without one need ``student_layers`` /
    ``teacher_layers``, e.g. the input of each stage's last ReLU.  ``margin``: see `teacher_margin`; its
    measured margins use the Distiller's example batch.
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 0.001, margin: Literal["auto", "last_bn", "empirical"] = "auto", student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        check_margin_source(margin)
        self.weight = weight
        self.margin = margin
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.student_taps, self.teacher_taps = stage_taps(
            "ofd", student_layout, teacher_layout, self.student_layers, self.teacher_layers,
            student_kind="preact", teacher_kind="preact")

    def build(self, setup) -> None:
        if setup.teacher is None or setup.example_input is None:
            raise ConfigError("ofd: needs the teacher and an example input to find its margins")
        self.connectors = nn.ModuleList()
        for i, (s, t) in enumerate(zip(self.student_taps, self.teacher_taps)):
            student_shape, teacher_shape = setup.student_shapes[s], setup.teacher_shapes[t]
            connector = ConvAdapter(student_shape[1], teacher_shape[1], student_shape[2:], relu=False)
            nn.init.kaiming_normal_(connector.body[0].weight, mode="fan_out", nonlinearity="relu")  # as mdistiller
            self.connectors.append(connector)
            margin = teacher_margin(setup.teacher, setup.teacher_paths[t], setup.example_input, self.margin,
                                    teacher_shape)
            self.register_buffer(f"margin{i}", margin.to(setup.example_input.device))

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        n = len(self.student_taps)
        total = 0.0
        for i, (connector, s, t) in enumerate(zip(self.connectors, self.student_taps, self.teacher_taps)):
            student = connector(ctx.student[s])
            teacher = resize_like(ctx.teacher[t], student.shape[-2:])
            total = total + ofd_loss(student, teacher, getattr(self, f"margin{i}")) / 2 ** (n - 1 - i)
        return {"ofd": self.weight * total}
