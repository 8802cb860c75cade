"""CRD: Tian et al., "Contrastive Representation Distillation", ICLR 2020.

Student and teacher penultimate features are embedded (linear, L2-normalised).  Two memory banks keep
a momentum average of every training sample's student and teacher embedding.  Each anchor is scored
against the other model's memory at its own sample (the positive, "exact" mode) and at K samples of
other classes (the negatives); NCE with uniform noise over the training set separates them, in both
directions (teacher anchor vs student memory and the reverse).  As in RepDistiller, the NCE
normalisation constant Z of each direction is estimated once, on the first training batch, and kept.

Negatives are drawn as RepDistiller's "exact" loader draws them: for each anchor, K samples of other classes
*without* replacement whenever K does not exceed those candidates (CIFAR-100: 16384 of 49500), with
replacement otherwise (tiny data sets).  They come from a `torch.Generator` the method owns on the memory's
device, never the global RNG: it is re-seeded for every batch from (seed, batches drawn), two integers kept
in the method's state dict (``get_extra_state``), so a resumed run draws exactly the negatives the
uninterrupted run would have.  The seed is drawn from the global RNG when the method is built (so it
follows the run's seed) unless ``seed`` is given.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import NonNegative, NonNegativeInt, Positive, PositiveInt, UnitInterval, register_method
from ..base import Context, Method, Setup

__all__ = ["nce_loss", "contrast_scores", "sample_negatives", "momentum_update", "CRD"]


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, sample: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """exp(<memory[sample[i, j]], anchor[i]> / T): (B, D) anchors, (N, D) memory, (B, K+1) indices -> (B, K+1).

    Scores every memory row then gathers the sampled ones: a (B, N) product is smaller than the
    (B, K+1, D) rows it would otherwise gather whenever N < (K+1) D (CIFAR and ImageNet alike).
    """
    return torch.exp((anchor @ memory.t()).gather(1, sample) / temperature)


def nce_loss(probabilities: torch.Tensor, num_samples: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE over (B, K+1) unnormalised model probabilities, the positive in column 0.

    With uniform noise Pn = 1/N and K noise draws per positive, the posterior that a pair came from
    the data is h = P / (P + K Pn); the loss is -(sum log h(positives) + sum log(1 - h(negatives))) / B.
    """
    k = probabilities.shape[1] - 1
    noise = k / num_samples
    log_positive = torch.log(probabilities[:, 0] / (probabilities[:, 0] + noise + eps))
    log_negative = torch.log(noise / (probabilities[:, 1:] + noise + eps))
    return -(log_positive.sum() + log_negative.sum()) / len(probabilities)


@torch.no_grad()
def momentum_update(memory: torch.Tensor, index: torch.Tensor, embedding: torch.Tensor,
                    momentum: float) -> torch.Tensor:
    """A copy of `memory` with rows `index` <- normalise(momentum * memory[index] + (1 - momentum) * embedding).

    Out of place: the scores of this batch were computed from `memory`, and their backward still needs it.
    """
    mixed = memory[index] * momentum + embedding.detach().to(memory.dtype) * (1 - momentum)
    return memory.index_copy(0, index, F.normalize(mixed, p=2, dim=1))


def sample_negatives(anchor_labels: torch.Tensor, by_class: torch.Tensor, class_start: torch.Tensor,
                     class_count: torch.Tensor, k: int, generator: Optional[torch.Generator] = None,
                     max_candidates: Optional[int] = None, chunk_elements: int = 1 << 25) -> torch.Tensor:
    """(B, k) sample indices of classes other than each anchor's, uniform, as RepDistiller's ``np.random.choice``:
    without replacement when the anchor has at least k candidates, with replacement otherwise.

    `by_class` lists every sample index sorted by class; class c occupies positions
    [class_start[c], class_start[c] + class_count[c]).  A draw over the positions outside that block is a draw
    over the other classes' samples.  Without replacement: the k largest of uniform keys over the candidate
    positions (a uniformly random k-subset), rows processed in chunks of at most `chunk_elements` keys.
    `max_candidates` (the most any anchor can have: N less the smallest class) spares reading it back from the
    device every batch.
    """
    device = by_class.device
    start, count = class_start[anchor_labels, None], class_count[anchor_labels, None]
    available = len(by_class) - count  # (B, 1) candidates per anchor
    width = max_candidates if max_candidates is not None else int(available.max())
    rows = max(1, chunk_elements // max(width, 1))
    chunks = []
    for lo in range(0, len(anchor_labels), rows):
        avail = available[lo:lo + rows]
        keys = torch.rand(len(avail), width, device=device, generator=generator)
        keys = keys.masked_fill(torch.arange(width, device=device) >= avail, -1.0)  # not a candidate
        distinct = keys.topk(min(k, width), dim=1, sorted=False).indices
        if k > width:  # every anchor has fewer candidates than k
            distinct = distinct.new_zeros(len(avail), k)
        repeated = (torch.rand(len(avail), k, device=device, generator=generator) * avail).long()
        repeated = torch.minimum(repeated, avail - 1)  # float rounding may reach the upper bound
        chunks.append(torch.where(avail >= k, distinct, repeated))
    position = torch.cat(chunks)
    position = position + count * (position >= start)  # skip the anchor's own class block
    return by_class[position]


@register_method("crd", description="contrastive loss with memory-bank negatives",
                 layers="penultimate (classifier input) on both models",
                 family="relation", paper="Tian et al. 2020, Contrastive Representation Distillation")
class CRD(Method):
    """Contrastive loss with memory-bank negatives.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        embed_dim: width of the shared L2-normalised embedding
        num_negatives: negatives K drawn per anchor from other classes
        temperature: temperature of the NCE scores
        momentum: memory-bank update: new = momentum * old + (1 - momentum) * embedding
        seed: seed of the negative sampler; null: drawn from the run's seed
        student_layer: student tap read (default: the embedding that enters the classifier)
        teacher_layer: teacher tap read (default: the embedding that enters the classifier)
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 0.8, embed_dim: PositiveInt = 128, num_negatives: PositiveInt = 16384,
                 temperature: Positive = 0.07, momentum: UnitInterval = 0.5, seed: Optional[NonNegativeInt] = None,
                 student_layer: str = "penultimate", teacher_layer: str = "penultimate"):
        super().__init__()
        self.seed = seed
        self.batches_drawn = 0
        self._generator: Optional[torch.Generator] = None
        self.weight = weight
        self.embed_dim = embed_dim
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.momentum = momentum
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def build(self, setup: Setup) -> None:
        if setup.num_samples is None:
            raise ConfigError("crd needs the training-set size for its memory banks: pass num_samples=len(train_set) "
                              "to Distiller")
        if setup.train_labels is None:
            raise ConfigError("crd's 'exact' sampling draws negatives from other classes and needs every training "
                              "label by sample index: pass train_labels to Distiller")
        labels = torch.as_tensor(setup.train_labels, dtype=torch.long).flatten().cpu()
        if len(labels) != setup.num_samples:
            raise ConfigError(f"crd: train_labels has {len(labels)} entries but num_samples is {setup.num_samples}")
        class_count = torch.bincount(labels, minlength=setup.num_classes)
        if int(class_count.max()) == setup.num_samples:
            raise ConfigError("crd: every training sample has the same class, so there are no negatives to draw")
        self.num_samples = setup.num_samples
        self.max_candidates = setup.num_samples - int(class_count.min())
        if self.seed is None:  # from the global RNG, so it follows the run's seed
            self.seed = int(torch.randint(0, 2**62, ()).item())
        self.k = min(self.num_negatives, setup.num_samples - 1)  # tiny data sets have fewer samples than 16384

        self.embed_student = nn.Linear(setup.student_shapes[self.student_taps[0]][1:].numel(), self.embed_dim)
        self.embed_teacher = nn.Linear(setup.teacher_shapes[self.teacher_taps[0]][1:].numel(), self.embed_dim)
        # Uniform in [-a, a] with a = 1/sqrt(D/3): each row starts with expected squared norm 1 (RepDistiller).
        bound = 1.0 / math.sqrt(self.embed_dim / 3)
        for name in ("memory_student", "memory_teacher"):
            self.register_buffer(name, torch.rand(setup.num_samples, self.embed_dim) * 2 * bound - bound)
        # Z of the student-anchor and teacher-anchor directions; 0 until the first training batch sets it.
        self.register_buffer("normalisers", torch.zeros(2))
        # Derived from the labels, so rebuilt by `build` rather than saved.
        self.register_buffer("train_labels", labels, persistent=False)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(class_count, 0) - class_count, persistent=False)
        self.register_buffer("class_count", class_count, persistent=False)

    def negatives_generator(self) -> torch.Generator:
        """The method's generator on the memory's device, seeded for the next batch from (seed, batches drawn)."""
        device = self.by_class.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed((self.seed * 1_000_003 + self.batches_drawn) % 2**63)
        self.batches_drawn += 1
        return self._generator

    def get_extra_state(self) -> dict:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn}

    def set_extra_state(self, state: dict) -> None:
        self.seed = None if state["seed"] is None else int(state["seed"])
        self.batches_drawn = int(state["batches_drawn"])

    def contrast_indices(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K+1) memory rows to score: each anchor's own sample, then K samples of other classes."""
        negatives = sample_negatives(self.train_labels[index], self.by_class, self.class_start, self.class_count,
                                     self.k, self.negatives_generator(), self.max_candidates)
        return torch.cat([index[:, None], negatives], dim=1)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        if ctx.index is None:
            raise ConfigError("crd needs the dataset index of every sample in the batch: call the Distiller with "
                              "index=... (make_loader yields (images, labels, index))")
        index = ctx.index.to(self.memory_student.device, torch.long)
        student = self.embed_student(ctx.student[self.student_taps[0]].flatten(1))
        teacher = self.embed_teacher(ctx.teacher[self.teacher_taps[0]].flatten(1))
        # float32 with autocast off: exp(score / 0.07) turns bf16 rounding into large relative errors.
        with torch.autocast(student.device.type, enabled=False):
            student = F.normalize(student.float(), p=2, dim=1)
            teacher = F.normalize(teacher.float(), p=2, dim=1)
            sample = self.contrast_indices(index)
            student_scores = contrast_scores(student, self.memory_teacher, sample, self.temperature)
            teacher_scores = contrast_scores(teacher, self.memory_student, sample, self.temperature)
            with torch.no_grad():  # Z is set once, without reading it back to the host
                estimate = torch.stack([student_scores.mean(), teacher_scores.mean()]) * self.num_samples
                normalisers = torch.where(self.normalisers > 0, self.normalisers, estimate)
            if self.training:
                self.normalisers.copy_(normalisers)
                self.memory_student = momentum_update(self.memory_student, index, student, self.momentum)
                self.memory_teacher = momentum_update(self.memory_teacher, index, teacher, self.momentum)
            loss = (nce_loss(student_scores / normalisers[0], self.num_samples)
                    + nce_loss(teacher_scores / normalisers[1], self.num_samples))
        return {"crd": self.weight * loss}
