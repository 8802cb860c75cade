"""KD3: Tang et al., "Distribution Shift Matters for Knowledge Distillation with Webly Collected Images",
ICCV 2023 ("Knowledge Distillation between Different Distributions", arXiv 2307.11469).

The original training data is gone; the student learns from the teacher on images collected from the web, whose
distribution differs from it, and whose labels (if any) are not read.  Three parts, as the abstract names them:
(a) instances are selected dynamically by the combined predictions of teacher and student; (b) the weighted
features and the classifier parameters of the two networks are aligned ("knowledge memorization"); (c) a
contrastive block, MixDistribution, perturbs feature statistics to create a new distribution, and an instance
alignment loss makes the student's representation invariant to it.

Our reading.  We found no code of the authors (searches for KD3, MixDistribution and the paper's title in code
indexes, and for the first author's repositories) and could read only the abstract, so every formula, weight
and threshold below is our choice:

- selection: p = beta * softmax(teacher) + (1 - beta) * softmax(student) (both constants); an instance is
  selected when max_c p >= ``threshold`` (0.5) and weighs its confidence max_c p, else 0.  It is dynamic: the
  student's share grows with its training, beta falling linearly from 1 (the teacher alone, while the student
  knows nothing) to ``teacher_share`` 0.5 over ``share_ramp_epochs`` 5, and the student's prediction changes
  as it learns, so the selected set moves from the instances the teacher is sure of to those both agree on;
- on the selected instances, weighted by their confidence: Hinton's KD (KL(teacher_T || student_T) * T^2, T 4)
  and the mean squared error between the student's penultimate feature, carried to the teacher's width by a
  learned linear map P, and the teacher's (weighted means over the batch, 0 when nothing is selected);
- classifier alignment: with the same P, the teacher's classifier read on P(h) is (W_T P) h + (W_T p + b_T); the
  student's classifier (W_S, b_S) is pulled toward it by the mean squared error of both (the teacher is a
  constant).  Both classifiers must be the Linear layer behind the models' ``penultimate`` tap;
- MixDistribution: the student sees each image twice (``student_input``); at ``mix_layer`` the second copy's
  features are renormalised to statistics mixed with another instance's, as MixStyle (Zhou et al. 2021,
  KaiyangZhou/mixstyle-release ``reid/models/mixstyle.py``:92-122: per-instance, per-channel mean and std over
  the spatial positions, detached, std = sqrt(var + eps) with eps 1e-6, lambda ~ Beta(alpha, alpha) with alpha
  0.1, a random permutation of the batch), applied to every second copy (MixStyle's p = 1) after the first
  stage (MixStyle inserts it after early stages, mixstyle.py / resnet_ms.py:360-372);
- instance alignment: InfoNCE between the student's perturbed penultimate feature (through P) and the teacher's
  clean feature of every instance in the batch, cosine similarities at temperature 0.1, the same instance the
  positive; all instances take part.

All four terms weigh 1 and no cross-entropy is used (``ce_weight`` 0): web data has no trusted labels.
The student's forward returns its predictions on the clean copies alone (the Distiller's logits); its tapped
features hold both copies, so combine KD3 only with methods that read logits, not student features.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import NonNegative, Positive, UnitInterval, register_method
from ...taps import get_module, split_tap
from ..base import Context, Method, Setup
from .lsskd import first_rows_of_output

__all__ = ["teacher_share_schedule", "combined_selection", "weighted_kd_loss", "weighted_feature_loss", "classifier_alignment_loss",
           "mix_distribution", "instance_alignment_loss", "perturbed_copies", "KD3Options", "KD3"]


def teacher_share_schedule(epoch: torch.Tensor | float, final_share: float, ramp_epochs: float) -> torch.Tensor:
    """The teacher's share of the combined prediction at (fractional) `epoch`: 1 - (1 - final) * min(epoch /
    ramp, 1), falling linearly from 1 to `final_share`; `final_share` throughout when `ramp_epochs` is 0.  Tensor
    arithmetic, so a compiled step reads the epoch as data."""
    epoch = torch.as_tensor(epoch, dtype=torch.float32)
    progress = torch.clamp(epoch / ramp_epochs, max=1.0) if ramp_epochs > 0 else torch.ones_like(epoch)
    return 1 - (1 - final_share) * progress


def combined_selection(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                       teacher_share: torch.Tensor | float = 0.5,
                       threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, pseudo labels) of a batch: p = share * softmax(teacher) + (1 - share) * softmax(student),
    constants; weight max_c p where it reaches `threshold`, else 0; pseudo label argmax_c p."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # at least single precision under autocast
    probs = (teacher_share * F.softmax(teacher_logits.detach().to(dtype), dim=1)
             + (1 - teacher_share) * F.softmax(student_logits.detach().to(dtype), dim=1))
    confidence, labels = probs.max(dim=1)
    return confidence * (confidence >= threshold).to(confidence.dtype), labels


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i, 0 where every weight is 0."""
    return (weights * values).sum() / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)


def weighted_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Per instance KL(softmax(teacher / T) || softmax(student / T)) * T^2, weighted mean over the batch."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    per_instance = (log_t.exp() * (log_t - log_s)).sum(dim=1) * temperature ** 2
    return _weighted_mean(per_instance, weights.to(per_instance.dtype))


def weighted_feature_loss(projected: torch.Tensor, teacher_feature: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """Per instance mean over dimensions of (projected - teacher)^2, weighted mean over the batch; the teacher's
    feature is a constant."""
    per_instance = ((projected - teacher_feature.detach()) ** 2).mean(dim=1)
    return _weighted_mean(per_instance, weights.to(per_instance.dtype))


def classifier_alignment_loss(student_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
                              teacher_weight: torch.Tensor, teacher_bias: Optional[torch.Tensor],
                              projector_weight: torch.Tensor, projector_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """mean((W_S - W_T P)^2) + mean((b_S - (W_T p + b_T))^2): the student's classifier against the teacher's read
    through the projector x -> P x + p (absent biases are zeros); the teacher's parameters are constants."""
    teacher_weight = teacher_weight.detach()
    weight_term = ((student_weight - teacher_weight @ projector_weight) ** 2).mean()
    target_bias = teacher_weight @ projector_bias if projector_bias is not None else \
        teacher_weight.new_zeros(teacher_weight.shape[0])
    if teacher_bias is not None:
        target_bias = target_bias + teacher_bias.detach()
    bias = student_bias if student_bias is not None else torch.zeros_like(target_bias)
    return weight_term + ((bias - target_bias) ** 2).mean()


def mix_distribution(features: torch.Tensor, permutation: torch.Tensor, mix_weights: torch.Tensor,
                     eps: float = 1e-6) -> torch.Tensor:
    """MixStyle's perturbation: each instance's per-channel mean mu and std sigma = sqrt(var + eps) (unbiased
    variance over the positions; both constants), x -> (x - mu) / sigma * sigma_mix + mu_mix with
    mu_mix = lam mu + (1 - lam) mu[perm], likewise sigma_mix; lam one weight per instance.  Maps (B, C, ...) take
    statistics over their positions, tokens (B, N, C) over N."""
    dims = (1,) if features.dim() == 3 else tuple(range(2, features.dim()))
    if math.prod(features.shape[d] for d in dims) < 2:
        raise ConfigError(f"kd3: mix_layer gives {list(features.shape)}, a single position per channel; its "
                          "statistics need a map (choose an earlier mix_layer)")
    mu = features.mean(dim=dims, keepdim=True).detach()
    sigma = (features.var(dim=dims, keepdim=True) + eps).sqrt().detach()
    lam = mix_weights.to(features.dtype).view(-1, *([1] * (features.dim() - 1)))
    mu_mix = lam * mu + (1 - lam) * mu[permutation]
    sigma_mix = lam * sigma + (1 - lam) * sigma[permutation]
    return (features - mu) / sigma * sigma_mix + mu_mix


def instance_alignment_loss(anchors: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: cross-entropy of cos(anchor_i, key_j) / T over j with j = i the positive, batch mean; the keys
    are constants."""
    similarity = F.normalize(anchors, dim=1) @ F.normalize(keys.detach(), dim=1).t() / temperature
    return F.cross_entropy(similarity, torch.arange(len(anchors), device=anchors.device))


@contextlib.contextmanager
def perturbed_copies(module: nn.Module, want_input: bool, rows: int, alpha: float,
                     eps: float = 1e-6) -> Iterator[None]:
    """Around a forward on a doubled batch (the images, then their copies): `module`'s output (its input with
    `want_input`) keeps its first `rows` rows and gets the others through `mix_distribution`, with a random
    permutation of them and weights from Beta(alpha, alpha)."""
    beta = torch.distributions.Beta(alpha, alpha)

    def perturb(x: torch.Tensor) -> torch.Tensor:
        count = x.shape[0] - rows
        permutation = torch.randperm(count, device=x.device)
        weights = beta.sample((count,)).to(x.device)
        return torch.cat([x[:rows], mix_distribution(x[rows:], permutation, weights, eps)])

    if want_input:
        handle = module.register_forward_pre_hook(lambda m, args: (perturb(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda m, inputs, output: perturb(output))
    try:
        yield
    finally:
        handle.remove()


def _classifier(model: nn.Module, penultimate: str, num_classes: int, which: str) -> nn.Linear:
    path, is_input = split_tap(penultimate)
    module = get_module(model, path) if is_input else None
    if not isinstance(module, nn.Linear) or module.out_features != num_classes:
        raise ConfigError(f"kd3: the {which}'s penultimate tap {penultimate!r} is not the input of a Linear "
                          f"classifier over {num_classes} classes; set classifier_weight: 0")
    return module


@dataclass(frozen=True)
class KD3Options:
    """KD3's options; every default is our choice (no code of the authors was available).

    Options:
        kd_weight: multiplier of the confidence-weighted KD on the selected instances
        feature_weight: multiplier of the confidence-weighted MSE of the projected penultimate features
        classifier_weight: multiplier of the classifier parameter alignment (0: skip it)
        contrast_weight: multiplier of the instance alignment (InfoNCE) of the MixDistribution copies
        temperature: softmax temperature of the KD
        teacher_share: the teacher's share beta of the combined prediction that selects instances, once ramped
        share_ramp_epochs: epochs over which beta falls from 1 (the teacher alone) to teacher_share; 0: no ramp
        threshold: the combined confidence an instance needs to be selected
        mix_layer: the student tap whose output MixDistribution perturbs (a map; ":input" for a module's input)
        mix_alpha: Beta(alpha, alpha) parameter of the mixing weight
        contrast_temperature: temperature of the InfoNCE similarities
    """

    kd_weight: NonNegative = 1.0
    feature_weight: NonNegative = 1.0
    classifier_weight: NonNegative = 1.0
    contrast_weight: NonNegative = 1.0
    temperature: Positive = 4.0
    teacher_share: UnitInterval = 0.5
    share_ramp_epochs: NonNegative = 5.0
    threshold: UnitInterval = 0.5
    mix_layer: str = "stage:0"
    mix_alpha: Positive = 0.1
    contrast_temperature: Positive = 0.1


@register_method("kd3", options=KD3Options, family="scheme", cross_arch=True,
                 description="web images: selected KD, MixDistribution",
                 scope="our reading (KD3's code and method section were not available to us): combined-prediction "
                       "selection, weighted KD and feature MSE, classifier alignment through the feature "
                       "projector, MixStyle-like MixDistribution with InfoNCE instance alignment; see the module "
                       "docstring",
                 layers="penultimate of both, logits; MixDistribution at the student's stage:0",
                 paper="Tang et al. 2023, Distribution Shift Matters for Knowledge Distillation with Webly "
                       "Collected Images (KD3)")
class KD3(Method):
    """Distillation on web images of another distribution; reads no label (``ce_weight`` 0).  The student sees
    each image twice, the second copy perturbed by MixDistribution at ``mix_layer``; a linear projector carries
    its penultimate feature to the teacher's width.  Options: see `KD3Options`."""

    ce_weight = 0.0

    def __init__(self, options: KD3Options = KD3Options()):
        super().__init__()
        self.options = options
        self.student_taps = ("penultimate",)
        self.teacher_taps = ("penultimate",)
        self._models: tuple[nn.Module, ...] = ()  # student, mix module, classifiers: read, never registered here

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.layouts = (student_layout, teacher_layout)
        try:
            self._mix_path = student_layout.resolve(self.options.mix_layer)
        except ConfigError as error:
            raise ConfigError(f"kd3: mix_layer {self.options.mix_layer!r}: {error}") from None

    def build(self, setup: Setup) -> None:
        s_shape, t_shape = setup.student_shapes["penultimate"], setup.teacher_shapes["penultimate"]
        if len(s_shape) != 2 or len(t_shape) != 2:
            raise ConfigError(f"kd3: the penultimate features are {list(s_shape)} (student) and {list(t_shape)} "
                              "(teacher), not (B, D) vectors")
        self.projector = nn.Linear(s_shape[1], t_shape[1])
        path, want_input = split_tap(self._mix_path)
        self._mix_input = want_input
        classifiers: tuple[nn.Module, ...] = ()
        if self.options.classifier_weight > 0:
            s_layout, t_layout = self.layouts
            classifiers = (_classifier(setup.student, s_layout.penultimate, setup.num_classes, "student"),
                           _classifier(setup.teacher, t_layout.penultimate, setup.num_classes, "teacher"))
        self._models = (setup.student, get_module(setup.student, path), *classifiers)

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images, images])

    def student_context(self, images: torch.Tensor) -> contextlib.AbstractContextManager:
        if not self._models:
            return contextlib.nullcontext()
        rows = len(images) // 2
        stack = contextlib.ExitStack()
        stack.enter_context(first_rows_of_output(self._models[0], rows))
        stack.enter_context(perturbed_copies(self._models[1], self._mix_input, rows, self.options.mix_alpha))
        return stack

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        o = self.options
        rows = len(ctx.teacher_logits)
        student_feature, teacher_feature = ctx.student["penultimate"], ctx.teacher["penultimate"]
        if student_feature.shape[0] != 2 * rows:
            raise ConfigError(f"kd3: the student's penultimate feature holds {student_feature.shape[0]} rows, not "
                              f"{2 * rows} (the batch and its MixDistribution copies): run the student through the "
                              "Distiller, which doubles its batch")
        clean, perturbed = self.projector(student_feature[:rows]), self.projector(student_feature[rows:])
        share = teacher_share_schedule(ctx.epoch, o.teacher_share, o.share_ramp_epochs)
        weights, _ = combined_selection(ctx.teacher_logits, ctx.student_logits, share.to(ctx.student_logits.device),
                                        o.threshold)
        losses = {
            "kd3_kd": o.kd_weight * weighted_kd_loss(ctx.student_logits, ctx.teacher_logits, weights, o.temperature),
            "kd3_feature": o.feature_weight * weighted_feature_loss(clean, teacher_feature, weights),
            "kd3_contrast": o.contrast_weight * instance_alignment_loss(perturbed, teacher_feature,
                                                                        o.contrast_temperature),
        }
        if o.classifier_weight > 0:
            student_fc, teacher_fc = self._models[2:]
            losses["kd3_classifier"] = o.classifier_weight * classifier_alignment_loss(
                student_fc.weight, student_fc.bias, teacher_fc.weight, teacher_fc.bias, self.projector.weight,
                self.projector.bias)
        return losses
