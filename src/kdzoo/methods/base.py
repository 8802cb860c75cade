"""The contract every distillation method follows.

A method is an `nn.Module` that declares the taps it reads and returns a dict of *weighted* losses.
Its math lives in pure functions beside it; the module only holds hyper-parameters and any learnable
adapter, which `build` creates once the Distiller knows the feature shapes.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import nn


@dataclass
class Context:
    """Everything a method may read for one batch."""

    student_logits: torch.Tensor
    teacher_logits: Optional[torch.Tensor]
    labels: torch.Tensor
    student: dict[str, torch.Tensor] = field(default_factory=dict)  # tap spec -> feature
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    index: Optional[torch.Tensor] = None  # dataset sample indices, for memory-bank methods
    epoch: torch.Tensor | float = 0.0  # fractional epoch as a 0-d tensor (a float when built by hand)
    # every teacher's logits by name, for methods that read all teachers (a distiller with several); the
    # fields above hold the teacher the method reads.  Labels of unlabelled samples are -1.
    teacher_logits_by_name: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features_by_name: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # the other students' logits (detached, in peer order) when students are trained together as peers
    peer_logits: tuple[torch.Tensor, ...] = ()
    # the other students' tapped features (detached, tap spec -> map, in peer order), for methods that read them
    peer_features: tuple[dict[str, torch.Tensor], ...] = ()
    # the student's own training losses when it computes them from the labels (a detector on its targets)
    student_losses: dict[str, torch.Tensor] = field(default_factory=dict)


def warmup_factor(epoch: torch.Tensor | float, warmup_epochs: float) -> torch.Tensor | float:
    """Linear loss warm-up as mdistiller's DKD/ReviewKD: min(epoch / warmup, 1) with epochs counted from 1
    and held for a whole epoch, so the first epoch already gets 1/warmup.  Tensor arithmetic, so a compiled
    step reads the epoch as data instead of recompiling for each value."""
    if warmup_epochs <= 0:
        return 1.0
    return torch.clamp((torch.floor(torch.as_tensor(epoch)) + 1) / warmup_epochs, max=1.0)


@dataclass
class Setup:
    """What a method may know when it builds its learnable parts."""

    student_shapes: dict[str, torch.Size]  # tap spec -> feature shape, batch dimension included
    teacher_shapes: dict[str, torch.Size]
    num_classes: int
    num_samples: Optional[int] = None  # training-set size, for memory banks
    train_labels: Optional[torch.Tensor] = None  # training labels by sample index (CRD's sampling)
    student: Optional[nn.Module] = None  # the models themselves, read-only, e.g. to find a teacher BN
    teacher: Optional[nn.Module] = None
    student_paths: dict[str, str] = field(default_factory=dict)  # tap spec -> module tap ("layer1.2.relu:input")
    teacher_paths: dict[str, str] = field(default_factory=dict)
    example_input: Optional[torch.Tensor] = None  # a small batch of real inputs
    train_data: Optional[Any] = None  # the training dataset (items: image, label, index), for statistics over it
    cache_dir: Optional[Path] = None  # where a method may keep what it computed once (the run directory)
    held_out_data: Optional[Any] = None  # labelled samples kept out of training, to choose evaluation-time weights
    # every named teacher of the distiller (read-only), for a method that also runs a teacher besides its own
    teachers: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class InitStage:
    """A stage a method runs before distillation (FitNet hints, FT paraphraser, AB, FSP).

    For `epochs` epochs only `parameters` are trained, on `method.init_loss(ctx)` alone.
    """

    epochs: int
    parameters: list[nn.Parameter]
    lr: Optional[float] = None  # None: the run's learning rate


class Method(nn.Module, abc.ABC):
    """Base class.  Subclasses set the class attributes and implement `forward`.

    - ``ce_weight``: the cross-entropy weight the method's paper pairs it with (None: no opinion).
    - ``needs_teacher``: False for methods that only use the student (self-distillation).
    - ``student_taps`` / ``teacher_taps``: tap specs read from ``ctx.student`` / ``ctx.teacher``;
      instances may override them from their own hyper-parameters.
    - ``needs_peers``: True for a method that reads the other students' outputs (``ctx.peer_logits``, mutual
      learning; ``ctx.peer_features``, their maps at the method's own ``student_taps``); a run then needs a
      ``peers:`` section.
    - ``ground_truth_weight``: the name of the option that weighs the labels (1) against the teacher (0), for a
      method whose loss mixes the two; ``rounds:`` (kdzoo.runner.rounds) trains a teacher-less first round with it at 1,
      and may estimate it each later round when written as ``estimate``.  An instance at 1 reads no teacher.
    - ``teacher_train_mode``: True for a method whose reference runs the (frozen) teacher with batch-statistics
      BatchNorm during training (OFD); the Distiller then puts the teacher in train mode while it trains.
    - ``reads_all_teachers``: True for a method that reads every teacher's logits (`Context.teacher_logits_by_name`,
      e.g. an ensemble target); such a method reads no teacher feature.
    - ``teacher_name``: which of a distiller's named teachers this instance reads (None: the first one); set
      from a method's ``teacher:`` config key.
    - ``reads_teacher_logits``: False for a method that reads only teacher features; when no method reads the
      teacher's logits the Distiller stops the teacher's forward after its deepest tapped layer.
    - ``reads_labels``: True for a method whose loss reads ``ctx.labels``; it cannot train on unlabelled samples
      (label -1), and the Distiller says so before training.
    - ``tasks``: the tasks the method distils (`kdzoo.tasks`): classification alone unless it makes sense per pixel
      (KD, DIST, AT, FitNet also distil segmenters) or was made for dense prediction; a run refuses the others.
    - ``reads_maps``: True for a method that reads dense predictions as maps (logits (B, C, H, W), masks (B, H, W):
      channel-wise or pair-wise distillation).  Every other method sees a dense batch as positions (logits
      (B * H * W, C), `kdzoo.distiller.position_view`), so a classification method distils each pixel.
    """

    ce_weight: ClassVar[Optional[float]] = None
    needs_teacher: ClassVar[bool] = True
    teacher_train_mode: ClassVar[bool] = False
    reads_all_teachers: ClassVar[bool] = False
    teacher_name: Optional[str] = None
    needs_peers: ClassVar[bool] = False
    ground_truth_weight: ClassVar[Optional[str]] = None
    reads_teacher_logits: ClassVar[bool] = True
    reads_labels: bool = False
    reads_maps: ClassVar[bool] = False
    tasks: ClassVar[frozenset[str]] = frozenset({"classification"})
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()

    def choose_taps(self, student_layout, teacher_layout) -> None:
        """Pick taps that depend on the models' layouts (e.g. "every stage").  Default: keep them."""

    def build(self, setup: Setup) -> None:
        """Create learnable parts from feature shapes and data facts.  Default: none."""

    def build_peers(self, peer_shapes: Sequence[dict[str, torch.Size]]) -> None:
        """Create learnable parts that read the other students' features (``Context.peer_features``) when students
        train as peers: `peer_shapes` holds each other student's tap spec -> feature shape (batch dimension
        included), in peer order.  Called once by `kdzoo.tasks.classification.PeerDistiller`.  Default: none."""

    def init_stage(self, student: nn.Module) -> Optional[InitStage]:
        """An optional stage to run before distillation; see `InitStage`.  Default: none."""
        return None

    def init_loss(self, ctx: Context) -> torch.Tensor:
        """The loss of the init stage (only called when `init_stage` returns one)."""
        raise TypeError(f"{type(self).__name__} has no init stage")

    def evaluation_model(self, student: nn.Module) -> Optional[nn.Module]:
        """The model that evaluation scores and the run exports beside the bare student, when this method
        changes how predictions are made (an extra head it trained, combined with weights it may choose here on
        `Setup.held_out_data`).  Called before each evaluation, in no_grad.  Default: None (the student alone)."""
        return None

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        """The batch the student sees (the teacher always sees `images`): a method that corrupts the student's
        input (masked patches) returns its own; the default passes the images through."""
        return images

    def student_context(self, images: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context around the student's forward on `images` (the batch `student_input` returned): e.g. patch
        tokens dropped inside a ViT (`kdzoo.models.vit.keep_patch_tokens`).  Default: none."""
        return contextlib.nullcontext()

    def layer_pairs(self) -> list[tuple[Optional[str], Optional[str]]]:
        """(student tap, teacher tap) spec pairs this method compares; a tap compared with nothing is paired with
        None.  Default: the taps in order when both lists are as long, else each list alone."""
        if len(self.student_taps) == len(self.teacher_taps):
            return list(zip(self.student_taps, self.teacher_taps))
        return [(s, None) for s in self.student_taps] + [(None, t) for t in self.teacher_taps]

    def adapters(self) -> dict[str, nn.Module]:
        """The learnable parts `build` created (regressors, projectors, embeddings), by attribute name."""
        return {name: module for name, module in self.named_children() if any(True for _ in module.parameters())}

    @abc.abstractmethod
    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        """Weighted loss terms, named; the trainer sums them."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")
