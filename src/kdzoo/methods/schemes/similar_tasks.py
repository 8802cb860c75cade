"""DistillNearest and DistillWeighted: Borup, Phoo & Hariharan, "Distilling from Similar Tasks for Transfer
Learning on a Budget", ICCV 2023 (arXiv 2304.12314).

Semi-supervised cross-domain distillation from a set of source models trained on other tasks (each with its own
label space) into one small target model, with no source data: only the sources' features and pseudo-labels on
the target images.  Before training, a task-similarity metric scores each source on the labelled target samples
(its penultimate features against the target labels).  DistillNearest distils from the best-scoring source
alone; DistillWeighted from several, each weighted by its relevance.  The student keeps its own classifier,
trained by cross-entropy on the labelled samples (the Distiller's, which skips label -1); each source it learns
from gets a new linear head on the student's penultimate embedding, sized to that source's label space, that
learns the source's pseudo-labels on every sample, labelled or not:

    L = CE(student(x_l), y_l) + weight * sum_s alpha_s * T^2 KL(softmax(t_s(x) / T) || softmax(h_s(e(x)) / T))

with e(x) the student's pooled penultimate embedding, h_s the head for source s, t_s the source's logits;
alpha is one-hot on the nearest source (DistillNearest) or ``relevance_weights`` (DistillWeighted).

The authors' code is not public: github.com/Kennethborup/DistillWeighted (HEAD c5851e3) holds a README that says
"Code and weights ... will be released here" and nothing else.  The paper text beyond its abstract was not
available to us either, so what follows is our reading, and `kdzoo methods distill_nearest` says so:

- the metric: GBC (Pandy et al. CVPR 2022, "Transferability Estimation using Bhattacharyya Class Separability"),
  a transferability metric on a source's features of the labelled target samples, as in the reference code
  (google-research/google-research at 1d4d2f1, ``stable_transfer/transferability/gbc.py``): per class a
  spherical Gaussian (mean; per-dimension biased variance floored at 1e-4, line 58-61, then averaged over
  dimensions, line 43-45),
  Bhattacharyya distance between each pair (line 27-34: (1/8) sum_d (mu_i - mu_j)^2 / s + (1/2) (log s -
  (log s_i + log s_j) / 2), s = (s_i + s_j) / 2, the log term not multiplied by the dimension), GBC = -sum over
  ordered pairs i != j of exp(-distance) (``get_gbc_score``, line 65-); the features are first reduced by PCA to
  64 dimensions (``config_transferability_source_selection.py``: gaussian_type 'spherical', pca_reduction 64;
  ``features_targets_utils.py``: sklearn PCA, centred, not whitened).  ``metric: knn`` is the leave-one-out
  1-nearest-neighbour accuracy (cosine) of the features instead.  Higher is more similar for both.
- the weights of DistillWeighted: the scores standardised over the sources kept (the ``top_k`` best, default all),
  then a softmax at ``weight_temperature``; our choice, scale-free so one temperature serves every metric.
- the distillation target: the sources' pseudo-labels (softmax at T = 1) through a new linear head per source
  (their label spaces differ from the target's and from each other's), KL as KD's; CE weight 1, distillation
  weight 1.  Source features enter the metric only (the Distiller hands a method reading every teacher their
  logits, not their features).
- the split: ``data.labelled_fraction`` (and ``data.labelled_indices``) keep the labels of some training
  samples; the metric reads those alone, the distillation every sample.

DistillNearest reads (runs) only the source it chose; DistillWeighted runs every source each step, those left
out by ``top_k`` included (the Distiller runs every teacher for a method that reads them all).  The metric runs
each source once over the labelled training samples as the training set yields them (augmented, if it augments).
The scores, the weights and the chosen source are printed and kept in the run's summary.json under
``task_similarity``.  A source whose class count differs from the target's works here (its head has its width),
but ``kdzoo train`` builds every configured teacher with the dataset's class count.
"""
from __future__ import annotations

import abc

import json
from pathlib import Path
from typing import ClassVar, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset

from ...data import UNLABELLED, labels_of
from ...engine.rundir import SUMMARY
from ...engine.runtime import atomic_write, is_main_process, resolve_device
from ...errors import ConfigError
from ...registry import NonNegative, Positive, PositiveInt, register_method
from ...taps import Taps, discover_layout
from ..base import Context, Method, Setup
from ..embeddings import embedding_width, pool_embedding
from ..logit.kd import kd_loss

__all__ = ["pca_project", "gbc_score", "knn_score", "task_similarity", "nearest_weights", "relevance_weights",
           "multi_source_loss", "source_features", "DistillNearest", "DistillWeighted"]

GBC_PCA_DIM = 64  # the reference code's pca_reduction
GBC_VARIANCE_FLOOR = 1e-4  # the reference code's floor on each per-class variance
SOURCE_TAP = "penultimate"  # the source feature the metric reads (the embedding that enters its classifier)


# ---------------------------------------------------------------- task similarity (pure functions)

def pca_project(features: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, D) features centred and projected on their first min(dim, N, D) principal directions (float64)."""
    x = features.double()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return x @ vh[:min(dim, *x.shape)].T


def gbc_score(features: torch.Tensor, labels: torch.Tensor, pca_dim: Optional[int] = GBC_PCA_DIM,
              variance_floor: float = GBC_VARIANCE_FLOOR) -> torch.Tensor:
    """Gaussian Bhattacharyya Coefficient with spherical class Gaussians (float64, <= 0; higher: classes better
    separated by these features): -sum over ordered pairs of present classes i != j of exp(-D_B(i, j))."""
    x = pca_project(features, pca_dim) if pca_dim else features.double()
    classes = labels.unique()
    means = torch.stack([x[labels == c].mean(0) for c in classes])
    variances = torch.stack([x[labels == c].var(0, unbiased=False).clamp_min(variance_floor).mean()
                             for c in classes])
    average = (variances[:, None] + variances[None, :]) / 2
    squared = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    distance = squared / (8 * average) + 0.5 * (average.log() - 0.5 * (variances[:, None].log()
                                                                       + variances[None, :].log()))
    coefficient = torch.exp(-distance)
    return -(coefficient.sum() - coefficient.diagonal().sum())


def knn_score(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Leave-one-out 1-nearest-neighbour accuracy (cosine similarity) of the features, in [0, 1] (float64)."""
    if len(labels) < 2:
        raise ConfigError("metric knn: needs at least 2 labelled samples")
    x = F.normalize(features.double(), dim=1)
    similarity = x @ x.T
    similarity.fill_diagonal_(float("-inf"))
    return (labels[similarity.argmax(1)] == labels).double().mean()


def task_similarity(features: torch.Tensor, labels: torch.Tensor, metric: str = "gbc") -> torch.Tensor:
    """One source's score on the target task: `metric` of its features of the labelled target samples."""
    if metric == "gbc":
        return gbc_score(features, labels)
    if metric == "knn":
        return knn_score(features, labels)
    raise ConfigError(f"metric: expected gbc or knn, got {metric!r}")


def nearest_weights(scores: torch.Tensor) -> torch.Tensor:
    """DistillNearest: weight 1 on the best score (the first of equal ones), 0 elsewhere (float64)."""
    weights = torch.zeros(len(scores), dtype=torch.float64)
    weights[int(torch.argmax(scores.double()))] = 1.0
    return weights


def relevance_weights(scores: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> torch.Tensor:
    """DistillWeighted: softmax(standardised scores / temperature) over the `top_k` best sources (default all;
    ties keep the earlier source), 0 for the others; the scores standardised (population std) over the kept ones,
    uniform where they are all equal.  Float64, sums to 1."""
    scores = scores.double()
    keep = torch.argsort(scores, descending=True, stable=True)[:top_k or len(scores)]
    kept = scores[keep]
    spread = kept.std(unbiased=False) if len(kept) > 1 else kept.new_zeros(())
    standardised = (kept - kept.mean()) / spread if spread > 0 else torch.zeros_like(kept)
    weights = torch.zeros_like(scores)
    weights[keep] = F.softmax(standardised / temperature, dim=0)
    return weights


# ---------------------------------------------------------------- the distillation loss (pure function)

def multi_source_loss(head_logits: Sequence[torch.Tensor], source_logits: Sequence[torch.Tensor],
                      weights: Sequence[float], temperature: float = 1.0) -> torch.Tensor:
    """sum_s weights[s] * T^2 KL(softmax(source_s / T) || softmax(head_s / T)), each mean over the batch; the
    sources are constants."""
    if not head_logits:
        raise ConfigError("similar-task distillation: no source to distil from")
    return sum(w * kd_loss(h, t, temperature) for h, t, w in zip(head_logits, source_logits, weights))


# ---------------------------------------------------------------- the sources' features of the labelled samples

@torch.no_grad()
def source_features(model: nn.Module, tap: str, dataset, batch_size: int = 256,
                    device: Optional[torch.device] = None) -> tuple[torch.Tensor, int]:
    """(pooled `tap` features of every item of `dataset`, float64 on the CPU; the model's output width), in eval
    mode.  On `device` the model runs through `functional_call` with copies of its weights there, so the module
    itself never moves."""
    device = device or next(model.parameters()).device
    weights = {name: value.to(device) for name, value in model.state_dict(keep_vars=True).items()}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    features, width = [], 0
    was_training = model.training
    model.eval()
    try:
        with Taps(model, [tap]) as taps:
            for batch in loader:
                logits = functional_call(model, weights, (batch[0].to(device),))
                width = int(logits.shape[1])
                features.append(pool_embedding(taps.get(tap), "similar-task distillation").double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(features), width


def labelled_samples(dataset) -> tuple[Subset, torch.Tensor]:
    """The labelled items of a training set (label != -1) and their labels."""
    labels = labels_of(dataset)
    keep = (labels != UNLABELLED).nonzero().flatten()
    return Subset(dataset, keep.tolist()), labels[keep]


# ---------------------------------------------------------------- the methods

class SimilarTasksDistillation(Method):
    """What DistillNearest and DistillWeighted share: the metric computed in `build`, one head per source used,
    the weighted pseudo-label loss."""

    ce_weight = 1.0
    student_taps = (SOURCE_TAP,)
    method_name: ClassVar[str] = "similar_tasks"

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, metric: str = "gbc",
                 stats_device: str = "auto"):
        super().__init__()
        self.weight, self.temperature, self.metric, self.stats_device = weight, temperature, metric, stats_device
        self.source_scores: dict[str, float] = {}
        self.source_weights: dict[str, float] = {}

    @abc.abstractmethod
    def choose_weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Each source's share of the distillation from its task-similarity score (DistillNearest: one-hot)."""

    def build(self, setup: Setup) -> None:
        sources = source_models(setup, self.method_name)
        if setup.train_data is None:
            raise ConfigError(f"{self.method_name}: the task similarity needs the training data (kdzoo train gives "
                              "it; a Distiller built by hand needs data=TrainingData.of(splits))")
        subset, labels = labelled_samples(setup.train_data)
        if len(labels) == 0:
            raise ConfigError(f"{self.method_name}: no labelled training sample to score the sources on "
                              "(data.labelled_fraction)")
        device = resolve_device(self.stats_device)
        scores, widths = [], {}
        for name, model in sources.items():
            example = setup.example_input.to(next(model.parameters()).device)
            tap = discover_layout(model, example).resolve(SOURCE_TAP)
            features, widths[name] = source_features(model, tap, subset, device=device)
            scores.append(task_similarity(features, labels, self.metric))
        scores = torch.stack(scores)
        weights = self.choose_weights(scores)
        names = list(sources)
        self.source_scores = {n: float(s) for n, s in zip(names, scores)}
        self.source_weights = {n: float(w) for n, w in zip(names, weights) if w > 0}
        width = embedding_width(setup.student_shapes[SOURCE_TAP], self.method_name)
        self.heads = nn.ModuleDict({n: nn.Linear(width, widths[n]) for n in self.source_weights})
        self.report(len(labels), setup.cache_dir)

    def report(self, labelled: int, run_dir: Optional[Path]) -> None:
        """Print the scores and weights; keep them in the run's summary.json (``task_similarity``)."""
        facts = {"metric": self.metric, "labelled_samples": labelled, "scores": self.source_scores,
                 "weights": self.source_weights}
        if not is_main_process():
            return
        shown = ", ".join(f"{n} {s:.4g}" for n, s in self.source_scores.items())
        used = ", ".join(f"{n} {w:.3f}" for n, w in self.source_weights.items())
        print(f"{self.method_name}: task similarity ({self.metric}, {labelled} labelled samples): {shown}; "
              f"distils from: {used}")
        if run_dir is not None:
            record_similarity(Path(run_dir), self.method_name, facts)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        embedding = pool_embedding(ctx.student[SOURCE_TAP], self.method_name)
        names = list(self.source_weights)
        loss = multi_source_loss([self.heads[n](embedding) for n in names],
                                 [self.source_logits(ctx, n) for n in names],
                                 [self.source_weights[n] for n in names], self.temperature)
        return {self.method_name: self.weight * loss}

    def source_logits(self, ctx: Context, name: str) -> torch.Tensor:
        return ctx.teacher_logits_by_name[name]


def source_models(setup: Setup, owner: str) -> dict[str, nn.Module]:
    """Every named teacher's module (`Setup.teachers`), else the one teacher of `setup`."""
    if setup.teachers:
        return dict(setup.teachers)
    if setup.teacher is None:
        raise ConfigError(f"{owner}: needs source models: a 'teachers:' section (or a 'teacher:')")
    return {"teacher": setup.teacher}


def record_similarity(run_dir: Path, method: str, facts: dict) -> None:
    """Add `facts` to run_dir/summary.json under task_similarity.<method>; the run keeps them in its final
    summary."""
    path = run_dir / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = {}
    summary = summary if isinstance(summary, dict) else {}
    summary.setdefault("task_similarity", {})[method] = facts
    text = json.dumps(summary, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))


SCOPE = ("our reading (the authors' code is unreleased and their paper's method section was not available to "
         "us): the source metric is GBC (or knn), the distillation target each source's pseudo-labels through a "
         "new linear head on the student's penultimate embedding, KL at T 1, CE 1 on the labelled samples")


@register_method("distill_nearest", family="scheme", cross_arch="logits",
                 description="distil the source most similar to the target task",
                 layers="the student's penultimate (a head per source); the sources' penultimate for the metric",
                 scope=f"DistillNearest, {SCOPE}",
                 paper="Borup, Phoo & Hariharan ICCV 2023, Distilling from Similar Tasks for Transfer Learning "
                       "on a Budget (DistillNearest)")
class DistillNearest(SimilarTasksDistillation):
    """Scores every teacher (``teachers:``, the sources) on the labelled training samples before training and
    distils from the best alone, through a new head on the student's penultimate embedding; only that source
    runs during training.  Defaults: our reading (weight 1, T 1, GBC, CE 1).

    Options:
        weight: multiplier of the pseudo-label distillation term
        temperature: softmax temperature of the source's pseudo-labels and the head (loss scaled by T^2)
        metric: task similarity of a source: gbc (Gaussian Bhattacharyya Coefficient of its features) or knn
            (leave-one-out 1-NN accuracy of its features)
        stats_device: where the sources run over the labelled samples: 'auto' (CUDA when present), 'cpu', 'cuda'
    """

    method_name = "distill_nearest"

    def __init__(self, weight: NonNegative = 1.0, temperature: Positive = 1.0,
                 metric: Literal["gbc", "knn"] = "gbc", stats_device: str = "auto"):
        super().__init__(weight, temperature, metric, stats_device)

    def build(self, setup: Setup) -> None:
        if self.teacher_name is not None and not getattr(self, "_chosen", False):
            raise ConfigError(f"distill_nearest chooses its source itself: remove the method's 'teacher: "
                              f"{self.teacher_name}'")
        super().build(setup)
        self.teacher_name, self._chosen = next(iter(self.source_weights)), True  # the Distiller runs it alone

    def choose_weights(self, scores: torch.Tensor) -> torch.Tensor:
        return nearest_weights(scores)

    def source_logits(self, ctx: Context, name: str) -> torch.Tensor:
        return ctx.teacher_logits  # the Distiller's view: the teacher this method reads, the chosen one


@register_method("distill_weighted", family="scheme", cross_arch="logits",
                 description="distil several sources weighted by task similarity",
                 layers="the student's penultimate (a head per source); the sources' penultimate for the metric",
                 scope=f"DistillWeighted, {SCOPE}; weights softmax(standardised scores / weight_temperature) over "
                       "the top_k sources (our choice)",
                 paper="Borup, Phoo & Hariharan ICCV 2023, Distilling from Similar Tasks for Transfer Learning "
                       "on a Budget (DistillWeighted)")
class DistillWeighted(SimilarTasksDistillation):
    """Scores every teacher (``teachers:``, the sources) on the labelled training samples before training and
    distils from the ``top_k`` best, each through its own head on the student's penultimate embedding, weighted
    by softmax(standardised score / weight_temperature).  Defaults: our reading (weight 1, T 1, GBC, every
    source, weight temperature 1, CE 1).

    Options:
        weight: multiplier of the weighted pseudo-label distillation term
        temperature: softmax temperature of the sources' pseudo-labels and the heads (loss scaled by T^2)
        metric: task similarity of a source: gbc (Gaussian Bhattacharyya Coefficient of its features) or knn
            (leave-one-out 1-NN accuracy of its features)
        top_k: how many of the best sources to distil from (null: all)
        weight_temperature: temperature of the softmax over the standardised scores (lower: sharper weights)
        stats_device: where the sources run over the labelled samples: 'auto' (CUDA when present), 'cpu', 'cuda'
    """

    method_name = "distill_weighted"
    reads_all_teachers = True

    def __init__(self, weight: NonNegative = 1.0, temperature: Positive = 1.0,
                 metric: Literal["gbc", "knn"] = "gbc", top_k: Optional[PositiveInt] = None,
                 weight_temperature: Positive = 1.0, stats_device: str = "auto"):
        super().__init__(weight, temperature, metric, stats_device)
        self.top_k, self.weight_temperature = top_k, weight_temperature

    def choose_weights(self, scores: torch.Tensor) -> torch.Tensor:
        return relevance_weights(scores, self.weight_temperature, self.top_k)
