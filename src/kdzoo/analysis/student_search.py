"""Training-free student search for a given teacher (DisWOT; Dong et al., CVPR 2023).

Each candidate student is scored *at initialisation*, on a few labelled batches, by how similar its
representations already are to the trained teacher's -- DisWOT's observation is that this similarity
predicts which student gains most from distillation.  Two distances, as in the authors' code
(lliai/DisWOT-CVPR2023, ``exps/parse_nb201_distill.py``):

* semantic: Grad-CAM's class-discriminative channel weights, i.e. the gradient of the cross-entropy w.r.t.
  the classifier weights, dW = (softmax(z) - onehot(y))' F / B (classes x features, F the feature entering
  the classifier).  Its rows say which channels each class is recognised by; their class-by-class Gram
  matrix, rows L2-normalised, is compared: ||G_s - G_t||_F^2 / classes.  (The authors compare the two
  gradient matrices through ICKD's channel Gram, which needs equal widths; the class-by-class Gram
  compares students of any width.)
* relation: similarity-preserving relations (Tung & Mori) of the last stage's feature maps:
  G = F F' over the batch, rows L2-normalised, ||G_s - G_t||_F^2 / batch^2.

Score = -(semantic + relation), averaged over the batches (higher is better).  The gradient is written in
closed form, so scoring is one no-grad forward per batch.  Choices: the teacher runs in eval mode (its
trained statistics), candidates in train mode (BatchNorm normalises a random network's activations with
batch statistics, as at the start of training; the candidates are thrown away afterwards), and every
candidate is built under a fixed seed so scores are reproducible.

`evolutionary_search` explores a width/depth space of one family (aging evolution, Real et al. 2019) under
a parameter budget; `rank_correlation` compares the ranking with real distillation results.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..engine.runtime import lazy_import, seed_everything
from ..errors import ConfigError
from ..models import create_model
from ..models.cifar_resnet import CifarResNet
from ..taps import Taps, discover_layout

flop_counter = lazy_import("torch.utils.flop_counter")  # loads triton (0.2 s)
scipy_stats = lazy_import("scipy.stats")

# ---------------------------------------------------------------- the two distances (pure functions)


def class_gradient(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """d(mean cross-entropy)/d(classifier weight) = (softmax(logits) - onehot(labels))' features / batch,
    for a linear classifier fed `features` (batch, dim): (classes, dim)."""
    residual = logits.double().softmax(dim=1) - F.one_hot(labels, logits.shape[1]).double()
    return residual.T @ features.reshape(features.shape[0], -1).double() / logits.shape[0]


def _normalised_gram(rows: torch.Tensor) -> torch.Tensor:
    flat = rows.reshape(rows.shape[0], -1).double()
    return F.normalize(flat @ flat.T, dim=1)


def semantic_distance(student_gradient: torch.Tensor, teacher_gradient: torch.Tensor) -> torch.Tensor:
    """||G_s - G_t||_F^2 / classes for the row-normalised class-by-class Gram matrices of `class_gradient`s."""
    difference = _normalised_gram(student_gradient) - _normalised_gram(teacher_gradient)
    return difference.square().sum() / student_gradient.shape[0]


def relation_distance(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving distance: ||G_s - G_t||_F^2 / batch^2, G = F F' rows L2-normalised."""
    difference = _normalised_gram(student_features) - _normalised_gram(teacher_features)
    return difference.square().sum() / student_features.shape[0] ** 2


# ---------------------------------------------------------------- scoring a candidate


@dataclass
class Candidate:
    """A student: a label, how to build it, and (once scored) its cost and scores."""

    label: str
    build: Callable[[], nn.Module]
    params: int = 0
    flops: int = 0
    semantic: float = float("nan")
    relation: float = float("nan")
    spec: dict = field(default_factory=dict)  # the search-space point, for evolution

    @property
    def score(self) -> float:
        return -(self.semantic + self.relation)


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward of `example` by torch's FLOP counter (a multiply-add counts 2)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


class TeacherSignals:
    """The teacher's class gradients and relation features on the scoring batches, computed once."""

    def __init__(self, teacher: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 relation_tap: str = "stage:-1"):
        self.batches = list(batches)
        if not self.batches:
            raise ConfigError("student search: no batches to score on")
        self.relation_tap = relation_tap
        was_training = teacher.training
        teacher.eval()
        try:
            taps = _signal_taps(teacher, self.batches[0][0][:2], relation_tap)
            self.signals = [_signals(teacher, taps, images, labels) for images, labels in self.batches]
        finally:
            teacher.train(was_training)


def _signal_taps(model: nn.Module, example: torch.Tensor, relation_tap: str) -> tuple[str, str]:
    """(classifier-input tap, relation tap) of a model."""
    layout = discover_layout(model, example)
    return layout.penultimate, layout.resolve(relation_tap)


@torch.no_grad()
def _signals(model: nn.Module, taps: tuple[str, str], images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class gradient, relation features) of `model` on one batch."""
    penultimate, relation = taps
    with Taps(model, [penultimate, relation]) as hooks:
        logits = model(images)
        return class_gradient(logits, labels, hooks.get(penultimate)), hooks.get(relation).detach().clone()


def score_candidate(candidate: Candidate, teacher: TeacherSignals, seed: int = 0) -> Candidate:
    """Build the candidate under `seed`, measure params and FLOPs, and fill in its two distances."""
    seed_everything(seed)
    model = candidate.build().to(teacher.batches[0][0].device)
    model.train()
    candidate.params = sum(p.numel() for p in model.parameters())
    candidate.flops = count_flops(model, teacher.batches[0][0][:1])
    taps = _signal_taps(model, teacher.batches[0][0][:2], teacher.relation_tap)
    semantic, relation = [], []
    for (images, labels), (teacher_gradient, teacher_features) in zip(teacher.batches, teacher.signals):
        gradient, features = _signals(model, taps, images, labels)
        semantic.append(float(semantic_distance(gradient, teacher_gradient)))
        relation.append(float(relation_distance(features, teacher_features)))
    candidate.semantic = sum(semantic) / len(semantic)
    candidate.relation = sum(relation) / len(relation)
    return candidate


def rank_candidates(candidates: Iterable[Candidate], teacher: TeacherSignals, seed: int = 0,
                    progress: Optional[Callable[[Candidate], None]] = None) -> list[Candidate]:
    """Score every candidate; best (highest score) first."""
    scored = []
    for candidate in candidates:
        scored.append(score_candidate(candidate, teacher, seed))
        if progress is not None:
            progress(candidate)
    return sorted(scored, key=lambda c: c.score, reverse=True)


# ---------------------------------------------------------------- search spaces


def zoo_candidate(spec: str, num_classes: int, in_channels: int) -> Candidate:
    """``"cifar:resnet20"`` or ``"tiny:cnn@width=8"`` (options after '@', comma-separated, values as YAML)."""
    name, _, option_text = spec.partition("@")
    options = {}
    for item in filter(None, option_text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"candidate {spec!r}: options are KEY=VALUE after '@', e.g. tiny:cnn@width=8")
        options[key] = yaml.safe_load(value)
    create_model(name, num_classes=num_classes, in_channels=in_channels, **options)  # fail now on a bad name
    label = name.split(":")[-1] + "".join(f"_{k}{v}" for k, v in sorted(options.items()))
    return Candidate(label, lambda: create_model(name, num_classes=num_classes, in_channels=in_channels, **options))


@dataclass
class SearchSpace:
    """A grid of choices per gene; `build(point)` makes the network of one point."""

    name: str
    genes: dict[str, list]
    make: Callable[[dict], nn.Module]
    label: Callable[[dict], str]

    def candidate(self, point: dict) -> Candidate:
        return Candidate(self.label(point), lambda: self.make(point), spec=dict(point))

    def random_point(self, rng: random.Random) -> dict:
        return {gene: rng.choice(choices) for gene, choices in self.genes.items()}

    def mutate(self, point: dict, rng: random.Random) -> dict:
        """Move one gene to a neighbouring choice (widths and depths change gradually)."""
        child = dict(point)
        gene = rng.choice([g for g, c in self.genes.items() if len(c) > 1])
        choices = self.genes[gene]
        i = choices.index(point[gene])
        child[gene] = choices[min(len(choices) - 1, max(0, i + rng.choice((-1, 1))))]
        return child

    def size(self) -> int:
        total = 1
        for choices in self.genes.values():
            total *= len(choices)
        return total


SPACES = ("cifar-resnet", "tiny-cnn")


def search_space(name: str, num_classes: int, in_channels: int) -> SearchSpace:
    """``cifar-resnet``: depth 6n+2 x base width w (stages w, 2w, 4w, the CIFAR ResNet family);
    ``tiny-cnn``: the width of kdzoo's tiny CNN."""
    if name == "cifar-resnet":
        return SearchSpace(
            name, {"depth": [8, 14, 20, 26, 32, 44, 56, 110], "width": [4, 8, 12, 16, 24, 32, 48, 64]},
            lambda p: CifarResNet(p["depth"], (p["width"], p["width"], 2 * p["width"], 4 * p["width"]),
                                  num_classes, in_channels),
            lambda p: f"resnet{p['depth']}_w{p['width']}")
    if name == "tiny-cnn":
        return SearchSpace(name, {"width": [2, 4, 6, 8, 12, 16, 24, 32, 48, 64]},
                           lambda p: create_model("tiny:cnn", num_classes, in_channels, width=p["width"]),
                           lambda p: f"cnn_width{p['width']}")
    raise ConfigError(f"search space {name!r}: choose one of {', '.join(SPACES)}")


def evolutionary_search(space: SearchSpace, teacher: TeacherSignals, *, evaluations: int = 40,
                        population: int = 10, sample: int = 3, max_params: Optional[int] = None,
                        seed: int = 0, progress: Optional[Callable[[Candidate], None]] = None) -> list[Candidate]:
    """Aging evolution: start from random points, then repeatedly mutate the best of `sample` random members
    of the population and retire the oldest.  Points over `max_params` are scored as infeasible (never
    parents).  Returns every distinct point scored, best first."""
    rng = random.Random(seed)
    scored: dict[tuple, Candidate] = {}

    def evaluate(point: dict) -> Candidate:
        key = tuple(sorted(point.items()))
        if key not in scored:
            candidate = score_candidate(space.candidate(point), teacher, seed)
            scored[key] = candidate
            if progress is not None:
                progress(candidate)
        return scored[key]

    def fitness(c: Candidate) -> float:
        return c.score if max_params is None or c.params <= max_params else float("-inf")

    budget = min(evaluations, space.size())
    queue: list[Candidate] = []
    attempts = 0
    while len(queue) < min(population, budget) and attempts < 20 * budget:
        attempts += 1
        point = space.random_point(rng)
        if tuple(sorted(point.items())) not in scored:
            queue.append(evaluate(point))
    while len(scored) < budget and attempts < 50 * budget:
        attempts += 1
        parent = max(rng.sample(queue, min(sample, len(queue))), key=fitness)
        child = evaluate(space.mutate(parent.spec, rng))
        queue.append(child)
        queue.pop(0)
    ranked = sorted(scored.values(), key=lambda c: (fitness(c) != float("-inf"), c.score), reverse=True)
    return ranked


# ---------------------------------------------------------------- against real results


def rank_correlation(scores: Sequence[float], accuracies: Sequence[float]) -> dict[str, float]:
    """Spearman's rho and Kendall's tau between zero-cost scores and measured accuracies (scipy)."""
    if len(scores) != len(accuracies) or len(scores) < 3:
        raise ConfigError(f"rank correlation needs at least 3 paired values, got {len(scores)}")
    return {"spearman": float(scipy_stats.spearmanr(scores, accuracies)[0]),
            "kendall": float(scipy_stats.kendalltau(scores, accuracies)[0])}


__all__ = ["class_gradient", "semantic_distance", "relation_distance", "Candidate", "TeacherSignals",
           "score_candidate", "rank_candidates", "zoo_candidate", "SearchSpace", "search_space", "SPACES",
           "evolutionary_search", "rank_correlation", "count_flops"]
