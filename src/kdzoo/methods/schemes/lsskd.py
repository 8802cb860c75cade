"""LSSKD: Dahri et al. 2025, "A Layered Self-Supervised Knowledge Distillation Framework for Efficient Multimodal
Learning on the Edge" (arXiv 2506.07055).

No pre-trained teacher: auxiliary classifiers on the student's intermediate stages learn a self-supervised
augmented task (each image in four rotations, labelled jointly with its class) and pass that knowledge one stage
to the next; the heads belong to this method, so the exported student is the plain model (no cost at inference).

Our reading.  We found no code of the LSSKD authors (searches for the paper's title and name, by its authors'
names, in code and documentation indexes) and could read only its abstract, so the pieces below come from the
method it builds on, HSAKD (Yang et al. 2021, "Hierarchical Self-supervised Augmented Knowledge Distillation"),
whose teacher-free "online" script is winycg/HSAKD ``train_online_kd_cifar.py``:

- the batch: every image in rotations 0, 90, 180, 270 degrees (``torch.rot90`` over H, W), joint label
  ``4 * y + k`` for rotation k (train_online_kd_cifar.py:182-183).  We lay the four copies out block by block
  (all rotations 0, then all 90, ...) where HSAKD interleaves them; the order changes nothing but lets the
  rotation-0 copies be the first rows;
- the main classifier learns only from the rotation-0 copies, cross-entropy with the labels (:195, weight 1);
  the student's forward returns those rows, so the Distiller's cross-entropy and the training accuracy read
  the clean batch (``ce_weight`` 1);
- each auxiliary head learns the joint labels on all four copies, cross-entropy, weight 1 (:199-201), and its
  gradient reaches the backbone (``net(input, grad=True)``, :189);
- knowledge moves between heads by HSAKD's ``DistillKL``: KL(softmax(target / T) || softmax(head / T)), batch
  mean, times T^2, the target a constant (:114-124), with T = 3 (``--kd_T``, :40).  HSAKD matches head i of one
  network with head i of another (its "one-to-one transfer"); LSSKD has a single network, so we match each head
  with the head of the next deeper stage (``transfer: adjacent``, the layered reading) or with the deepest head
  (``transfer: deepest``).  This pairing is ours;
- a head follows HSAKD's ``Auxiliary_Classifier`` (models/resnet.py:195-263): the tapped map runs through the
  depth that the backbone's later stages would have given it, down to the deepest stage's resolution and width,
  then global pooling and a linear layer to ``4 x classes`` outputs (resnet.py:270).  HSAKD copies the later
  residual stages; to stay model-agnostic each stage becomes one 3x3 conv + BN + ReLU (stride 2 per halving of
  the resolution, widths growing geometrically to the deepest width; a stride-1 block on the deepest stage
  itself, as HSAKD's ``block_extractor3``), initialised as HSAKD's (resnet.py:222-230).

The heads go on every stage of the student's layout by default, as HSAKD's three on the CIFAR ResNets' three
stages.  Images must be square so that the rotated copies form one batch.  The student's tapped features hold
the four copies (4B rows); combine LSSKD only with methods that read logits, not student features.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method, Setup

__all__ = ["ROTATIONS", "rotated_copies", "joint_rotation_labels", "distill_kl", "layered_transfer_loss",
           "first_rows_of_output", "AugmentedLabelHead", "LSSKD"]

ROTATIONS = 4  # 0, 90, 180, 270 degrees


def rotated_copies(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (4B, C, H, W): the batch rotated by k * 90 degrees for k = 0..3, one block of B per k."""
    return torch.cat([torch.rot90(images, k, (2, 3)) for k in range(ROTATIONS)])


def joint_rotation_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B,) -> (4B,): the joint label 4 * y + k of each rotated copy, in `rotated_copies`' order."""
    return torch.cat([labels * ROTATIONS + k for k in range(ROTATIONS)])


def distill_kl(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(target / T) || softmax(logits / T)) summed over classes, averaged over rows, times T^2; the
    target is a constant (HSAKD's DistillKL)."""
    # at least float32: a KL of near-equal rows loses its digits in bfloat16
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits.to(dtype) / temperature, dim=1)
    log_q = F.log_softmax(target_logits.detach().to(dtype) / temperature, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean() * temperature ** 2


def layered_transfer_loss(head_logits: Sequence[torch.Tensor], temperature: float,
                          transfer: str = "adjacent") -> torch.Tensor:
    """The sum of `distill_kl` from each head (shallow to deep) to its target: the next deeper head
    (``adjacent``) or the deepest (``deepest``).  The deepest head has no target; 0 with a single head."""
    total = head_logits[-1].new_zeros(())
    for i, logits in enumerate(head_logits[:-1]):
        target = head_logits[i + 1] if transfer == "adjacent" else head_logits[-1]
        total = total + distill_kl(logits, target, temperature)
    return total


@contextlib.contextmanager
def first_rows_of_output(model: nn.Module, rows: int) -> Iterator[None]:
    """Around a forward of `model` on an enlarged batch (copies of the images appended after them): the forward
    returns only its first `rows` rows, the predictions on the images themselves, so the Distiller's
    cross-entropy and the training accuracy read one prediction per label; the tapped features keep every row."""

    def keep_first(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"the student returns a {type(output).__name__}, not a logits tensor; this method "
                              "needs a classifier that returns one")
        return output[:rows]

    handle = model.register_forward_hook(keep_first)
    try:
        yield
    finally:
        handle.remove()


class AugmentedLabelHead(nn.Module):
    """An auxiliary classifier over joint (class, rotation) labels: `downsamplings` stride-2 and at least one
    3x3 conv + BN + ReLU blocks from `in_channels` to `deep_channels` (widths growing geometrically), global
    average pooling, a linear layer to `num_outputs`."""

    def __init__(self, in_channels: int, deep_channels: int, downsamplings: int, num_outputs: int):
        super().__init__()
        steps = max(1, downsamplings)
        widths = [round(in_channels * (deep_channels / in_channels) ** (k / steps)) for k in range(1, steps)]
        widths.append(deep_channels)
        layers, width = [], in_channels
        for k, out in enumerate(widths):
            layers += [nn.Conv2d(width, out, 3, 2 if k < downsamplings else 1, 1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            width = out
        self.blocks = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(deep_channels, num_outputs)
        for m in self.modules():  # HSAKD's initialisation (models/resnet.py:222-230)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(feature_map))


@register_method("lsskd", family="scheme", description="rotation x class heads per stage, layered KL",
                 scope="our reading (LSSKD's code and method section were not available to us): HSAKD's "
                       "teacher-free rotation x class auxiliary heads with a KL from each head to the next deeper "
                       "one; see the module docstring",
                 layers="every stage of the student (auxiliary heads), logits",
                 paper="Dahri et al. 2025, A Layered Self-Supervised Knowledge Distillation Framework for Efficient "
                       "Multimodal Learning on the Edge (LSSKD); after Yang et al. 2021, HSAKD")
class LSSKD(Method):
    """Teacher-free: the student sees every image in four rotations; a head on each of ``student_layers``
    learns the joint (class, rotation) labels and the deeper heads' softened predictions.  The heads are the
    method's, not the student's.

    Options:
        head_weight: multiplier of the heads' cross-entropy with the joint (class, rotation) labels
        kd_weight: multiplier of the KL from each head to its target head
        temperature: softmax temperature of the KL
        transfer: adjacent (each head learns from the next deeper head) or deepest (from the deepest head)
        student_layers: the taps that get heads, shallow to deep; null: every stage
    """

    reads_labels = True
    ce_weight = 1.0
    needs_teacher = False

    def __init__(self, head_weight: NonNegative = 1.0, kd_weight: NonNegative = 1.0, temperature: Positive = 3.0,
                 transfer: Literal["adjacent", "deepest"] = "adjacent", student_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.head_weight = head_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.transfer = transfer
        self.student_layers = tuple(student_layers or ())
        self.student_taps = (*self.student_layers, "stage:-1")
        self._student: tuple[nn.Module, ...] = ()  # the student, for the output hook (not a submodule)

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.layout = student_layout
        if not self.student_layers:
            self.student_layers = tuple(f"stage:{i}" for i in range(len(student_layout.stages)))
        self.student_taps = tuple(dict.fromkeys((*self.student_layers, "stage:-1")))

    def build(self, setup: Setup) -> None:
        example = setup.example_input
        if example is None or example.dim() != 4 or example.shape[-1] != example.shape[-2]:
            shape = list(example.shape) if example is not None else None
            raise ConfigError(f"lsskd: rotating the images needs square image batches (B, C, H, H), got {shape}")
        deepest = self.layout.map_shape(setup.student_shapes["stage:-1"])
        heads = []
        for spec in self.student_layers:
            shape = self.layout.map_shape(setup.student_shapes[spec])
            if len(shape) != 4:
                raise ConfigError(f"lsskd: student_layers {spec!r} gives {list(shape)}, not a feature map")
            halvings = max(0, round(math.log2(shape[2] / deepest[2]))) if shape[2] > deepest[2] else 0
            heads.append(AugmentedLabelHead(shape[1], deepest[1], halvings, ROTATIONS * setup.num_classes))
        self.heads = nn.ModuleList(heads)
        self._student = (setup.student,)

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ConfigError(f"lsskd: rotating the images needs square image batches, got {list(images.shape)}")
        return rotated_copies(images)

    def student_context(self, images: torch.Tensor) -> contextlib.AbstractContextManager:
        if not self._student:
            return contextlib.nullcontext()
        return first_rows_of_output(self._student[0], len(images) // ROTATIONS)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        joint = joint_rotation_labels(ctx.labels)
        head_logits = []
        for spec, head in zip(self.student_layers, self.heads):
            feature = ctx.student[spec]
            if feature.shape[0] != len(joint):
                raise ConfigError(f"lsskd: the student's {spec!r} holds {feature.shape[0]} rows, not the "
                                  f"{len(joint)} of the batch's four rotations (run the student through the "
                                  "Distiller, which rotates its batch)")
            head_logits.append(head(self.layout.feature_map(feature)))
        ce = sum(F.cross_entropy(logits, joint) for logits in head_logits)
        kd = layered_transfer_loss(head_logits, self.temperature, self.transfer)
        return {"lsskd_ce": self.head_weight * ce, "lsskd_kd": self.kd_weight * kd}
