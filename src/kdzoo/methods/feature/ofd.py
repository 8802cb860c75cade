"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019."""
from __future__ import annotations

import copy
import math
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from ...adapters import ConvAdapter, resize_like
from ...errors import ConfigError
from ...registry import NonNegative, PositiveInt, register_method
from ...taps import get_module, split_tap, stage_taps
from ..base import Context, Method
from .normalize import layer_normalized_loss

__all__ = ["ofd_loss", "teacher_margin", "measured_margin", "batchnorm_margin", "OFD"]

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


class _NegativeStats:
    """Running per-channel sums for E[x | x < 0] (and the std fallback) over batches of (B, C, H, W) maps."""

    def __init__(self):
        self.negative_sum = self.negative_count = self.total = self.sum = self.square_sum = 0

    def add(self, feature: torch.Tensor) -> None:
        x = feature.detach().double().transpose(0, 1).flatten(1)  # (C, N); float64 sums over many images
        negative = x < 0
        self.negative_sum = self.negative_sum + (x * negative).sum(1)
        self.negative_count = self.negative_count + negative.sum(1)
        self.total += x.shape[1]
        self.sum = self.sum + x.sum(1)
        self.square_sum = self.square_sum + x.pow(2).sum(1)

    def margin(self) -> torch.Tensor:
        mean_negative = self.negative_sum / self.negative_count.clamp_min(1)
        variance = (self.square_sum / self.total - (self.sum / self.total).pow(2)).clamp_min(0)
        return torch.where(self.negative_count > 0, mean_negative, -3 * variance.sqrt()).float()


def empirical_margin(feature: torch.Tensor) -> torch.Tensor:
    """E[x | x < 0] per channel measured on feature maps (B, C, H, W); -3 std for a channel without
    negative values."""
    stats = _NegativeStats()
    stats.add(feature)
    return stats.margin()


def _image_batches(images, num_samples: int, batch_size: int, device):
    """Batches of images from a tensor (used whole) or a dataset of (image, label, ...) items (a fixed random
    subset of `num_samples`)."""
    if isinstance(images, torch.Tensor):
        yield images.to(device)
        return
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:num_samples].tolist()
    for start in range(0, len(order), batch_size):
        items = [images[i] for i in order[start:start + batch_size]]
        yield torch.stack([torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item)
                           for item in items]).to(device)


@torch.no_grad()
def measured_margin(teacher: nn.Module, tap: str, images, num_samples: int = 4096,
                    batch_size: int = 128) -> torch.Tensor:
    """E[x | x < 0] per channel of the teacher's feature at module tap `tap`, measured over `images`: a tensor
    batch, or a dataset of which a fixed random subset of `num_samples` items is read in batches.

    The teacher runs as it does during OFD, with batch-statistics BatchNorm (see `OFD`); a copy of it does,
    so its running statistics stay untouched.
    """
    path, want_input = split_tap(tap)
    model = copy.deepcopy(teacher).train()
    module = get_module(model, path)
    stats, seen = _NegativeStats(), []

    def record(value: torch.Tensor) -> None:
        seen.append(True)
        stats.add(value)

    if want_input:
        handle = module.register_forward_pre_hook(lambda m, inputs: record(inputs[0]))
    else:
        handle = module.register_forward_hook(lambda m, inputs, output: record(output))
    device = next(model.parameters()).device
    try:
        for batch in _image_batches(images, num_samples, batch_size, device):
            model(batch)
    finally:
        handle.remove()
    if not seen:
        raise ConfigError(f"ofd: the teacher never called {path!r}")
    return stats.margin()


@torch.no_grad()
def teacher_margin(teacher: nn.Module, tap: str, images, source: str = "last_bn",
                   feature_shape: Optional[torch.Size] = None, num_samples: int = 4096,
                   batch_size: int = 128) -> torch.Tensor:
    """The per-channel margin of the teacher's pre-ReLU feature at module tap `tap`, shape (C,).

    With `source`:
      - "last_bn" (default): the closed form from the last BatchNorm2d of the feature's shape called before
        the tap, even across a residual sum: the authors' and mdistiller's ``get_bn_before_relu`` (``bn2`` of a
        stage's last block, VGG's last BN of a block, WRN's next ``bn1``).  One forward of `images` (its first
        batch) finds the call order;
      - "auto": that BN when its output *is* the feature (equal values), else measured;
      - "empirical": always measured, by `measured_margin` over `images` (a dataset or a tensor batch).
    `feature_shape` (when known) restricts the BN outputs copied to those of the feature's shape.
    """
    check_margin_source(source)
    if source == "empirical":
        return measured_margin(teacher, tap, images, num_samples, batch_size)
    device = next(teacher.parameters()).device
    example = next(_image_batches(images, min(num_samples, batch_size), batch_size, device))
    path, want_input = split_tap(tap)
    module = get_module(teacher, path)
    seen: dict[str, object] = {}
    bn_outputs: list[tuple[nn.BatchNorm2d, torch.Tensor]] = []

    def record_feature(value: torch.Tensor) -> None:
        seen["feature"], seen["bn_calls"] = value.clone(), len(bn_outputs)

    def record_bn(bn, inputs, output) -> None:
        if feature_shape is None or tuple(output.shape[1:]) == tuple(feature_shape[1:]):
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
    if source == "last_bn":
        if not candidates:
            raise ConfigError(f"ofd: no BatchNorm2d of the feature's shape runs before {tap!r}, so the margin has "
                              "no closed form; use margin: empirical")
        return batchnorm_margin(candidates[-1][0])
    for bn, out in reversed(candidates):
        if torch.equal(out, feature):
            return batchnorm_margin(bn)
    return measured_margin(teacher, tap, images, num_samples, batch_size)


def ofd_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 between the connected student feature and the teacher's pre-ReLU feature.

    The teacher's negative responses are first raised to the channel's margin (target = max(t, m));
    positions where the student is already at or below a non-positive target are skipped, as the ReLU
    would erase the difference.  Summed over channels and positions, averaged over the batch (mdistiller).
    Computed in float32 with autocast off: a sum over every position of a map overflows bf16's precision.
    """
    with torch.autocast(student_feature.device.type, enabled=False):
        student_feature, teacher_feature = student_feature.float(), teacher_feature.float()
        margin = margin.to(teacher_feature).view(1, -1, 1, 1)
        target = torch.maximum(teacher_feature, margin)
        counted = (student_feature > target) | (teacher_feature > 0)
        return ((student_feature - target).pow(2) * counted).sum() / student_feature.shape[0]


@register_method("ofd", description="pre-ReLU features, teacher-margin partial L2",
                 layers="pre-ReLU output of every stage after the stem (the family's 'preact' list)",
                 family="feature", paper="Heo et al. 2019, A Comprehensive Overhaul of Feature Distillation")
class OFD(Method):
    """Per stage, a 1x1 conv + BN connector maps the student's pre-ReLU feature to the teacher's width; the
    teacher's pre-ReLU feature is average-pooled to the student's size.  As mdistiller: every stage after the
    stem, the deepest weighing 1 and each shallower one half the next, weight 0.001.

    The teacher runs with batch-statistics BatchNorm (``teacher_train_mode``), as in the authors' code
    (clovaai/overhaul-distillation sets ``t_net.train()``) and mdistiller (its ``OFD.train`` puts every child,
    the teacher included, in train mode): the margins describe a BN output ~ N(beta, gamma^2), which is what
    a batch-normalised teacher produces.  Unlike there, the teacher's running statistics are left as loaded (the
    Distiller runs it on copies of its buffers); OFD never reads them, so its training is the same.

    Taps: the "preact" list the model family publishes; models without one need ``student_layers`` /
    ``teacher_layers``, e.g. the input of each stage's last ReLU.  ``margin``: "last_bn" (default, mdistiller's
    closed form), "auto" or "empirical" (see `teacher_margin`); a measured margin reads ``margin_samples``
    training images (the run's training set, never the example batch).  ``normalize_layers``: see
    `layer_normalized_loss`.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        margin: teacher margin: 'last_bn' (closed form from BN), 'auto' or 'empirical' (measured)
        margin_samples: training images read to measure the margin ('auto'/'empirical')
        normalize_layers: divide each layer's term by the mean square of the teacher's feature there (evens out
            layer sizes)
        student_layers: student taps (pre-ReLU stage outputs); null: the 'preact' list the model family
            publishes, every stage after the stem
        teacher_layers: teacher taps, one per entry of student_layers; null: the teacher's 'preact' list
    """

    ce_weight = 1.0
    teacher_train_mode = True

    def __init__(self, weight: NonNegative = 0.001, margin: Literal["auto", "last_bn", "empirical"] = "last_bn",
                 margin_samples: PositiveInt = 4096, normalize_layers: bool = False,
                 student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        check_margin_source(margin)
        if margin_samples < 1:
            raise ConfigError(f"ofd: margin_samples must be positive, got {margin_samples}")
        self.weight = weight
        self.margin = margin
        self.margin_samples = margin_samples
        self.normalize_layers = normalize_layers
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.student_taps, self.teacher_taps = stage_taps(
            "ofd", student_layout, teacher_layout, self.student_layers, self.teacher_layers,
            student_kind="preact", teacher_kind="preact")

    def build(self, setup) -> None:
        if setup.teacher is None or setup.example_input is None:
            raise ConfigError("ofd: needs the teacher and an example input to find its margins")
        if self.margin != "last_bn" and setup.train_data is None:
            raise ConfigError(f"ofd: margin {self.margin!r} is measured on training images, but the Distiller got "
                              "no train_data; pass train_data=... or use margin: last_bn")
        images = setup.train_data if setup.train_data is not None else setup.example_input
        self.connectors = nn.ModuleList()
        for i, (s, t) in enumerate(zip(self.student_taps, self.teacher_taps)):
            student_shape, teacher_shape = setup.student_shapes[s], setup.teacher_shapes[t]
            connector = ConvAdapter(student_shape[1], teacher_shape[1], student_shape[2:], relu=False)
            nn.init.kaiming_normal_(connector.body[0].weight, mode="fan_out", nonlinearity="relu")  # as mdistiller
            self.connectors.append(connector)
            margin = teacher_margin(setup.teacher, setup.teacher_paths[t], images, self.margin, teacher_shape,
                                    num_samples=self.margin_samples)
            self.register_buffer(f"margin{i}", margin.to(setup.example_input.device))

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        n = len(self.student_taps)
        terms, targets = [], []
        for i, (connector, s, t) in enumerate(zip(self.connectors, self.student_taps, self.teacher_taps)):
            student = connector(ctx.student[s])
            teacher = resize_like(ctx.teacher[t], student.shape[-2:])
            terms.append(ofd_loss(student, teacher, getattr(self, f"margin{i}")) / 2 ** (n - 1 - i))
            targets.append(teacher)
        return {"ofd": self.weight * layer_normalized_loss(terms, targets, self.normalize_layers)}
