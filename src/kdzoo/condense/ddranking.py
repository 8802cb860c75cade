"""DD-Ranking's fair evaluation of a distilled dataset (Li et al. 2025, "DD-Ranking: Rethinking the Evaluation of
Dataset Distillation", arXiv 2505.13300; package ``ddranking``, github.com/NUS-HPC-AI-Lab/DD-Ranking).

Test accuracy alone rewards soft labels and augmentation as much as the images, so DD-Ranking compares a
synthetic set with the real data and with random real images under the same protocol (accuracies in %):

- ``HLR = Acc(real, hard) - Acc(syn, hard)``: hard label recovery, how far the set is from the full training
  set when both train with hard labels (lower is better);
- ``IOR = Acc(syn, any) - Acc(random, any)``: improvement over random, the set under its own labels and protocol
  against randomly chosen real images, the same number per class, under the same labels and protocol;
- ``LRS``: label-robust score, ``alpha = w IOR - (1 - w) HLR`` (``w`` = ``lrs_lambda``, 0.5 by default) mapped
  to [0, 100] % by ``(e^alpha - e^-1) / (e - e^-1)``;
- ``ARS``: augmentation-robust score, ``beta = g (syn - random with augmentation) + (1 - g) (syn - random
  without)`` mapped the same way.

Read in the reference (main branch; the 0.2.0 wheel in its dist/ has the same lines):
``ddranking/metrics/hard_label.py`` lines 380-383 and ``ddranking/metrics/soft_label.py`` lines 561-564 (HLR,
IOR, alpha, LRS; the soft class takes IOR from soft-label runs and HLR from hard-label runs), and
``ddranking/metrics/aug_robust.py`` lines 577-580 (ARS); the definitions in README.md "Label-Robust Score" /
"Augmentation-Robust Score" and doc/introduction.md (which writes LRS "x 100 %").  Every round ("num_eval", 5 by
default) draws a fresh random subset (``get_random_data_tensors``, ``random.sample`` of IPC images of every
class, ddranking/utils/data.py line 215) and computes the scores; the reported score is the mean (and population
std, ``np.std``) of the per-round scores, not the score of the mean accuracies.  (hard_label.py appends each round's
LRS twice, lines 384 and 388; duplicating every value changes neither the mean nor the std.)

Where ours differs, on purpose or by reading:

- Units: the package computes alpha from accuracies in % (its ``validate`` returns %, so alpha can reach 50 and
  the "normalised" score e^50), while its README says the score is normalised to [0, 1]; that holds only for
  accuracies as fractions, which is what we use: ``alpha`` from HLR/100 and IOR/100, LRS in % (doc/introduction.md).
- Accuracy: the package keeps the best test accuracy over checkpoints every 10 epochs; kdzoo's
  `evaluate_synthetic` reports the accuracy after the last epoch (no test-set selection).
- Learning rate: the package searches (0.001, 0.005, 0.01, 0.05, 0.1) by test accuracy for the random subset
  (always) and for the synthetic set when it brings no learned lr; ``lr_grid=REFERENCE_LR_GRID`` does that,
  the default (None) trains everything with the set's own protocol lr.
- Seeds: the package seeds every round from the clock; ours from ``seed`` (reproducible).
- Full-data accuracy: the package trains on the full set every round (``eval_full_data``) or reads a cache of
  two ImageNet/Tiny-ImageNet ResNet-18 numbers; ours takes it as an option or trains ``real_models`` networks
  once for ``real_epochs`` (SGD, lr 0.01 decayed x0.1 at half time, no augmentation, as its
  REAL_DATA_TRAINING_CONFIG for ConvNet-3 CIFAR) and caches it.
- Soft labels of the random images: the package labels them with a pre-trained teacher.  A decoupled method's set
  (SRe2L, RDED, ...) carries its teacher (the observer), which relabels the random subsets' crops exactly as the
  set's own; its hard-label runs train without it.  A set with stored committee labels: the committee is not saved, so unless ``soft_labeller`` is given a committee with the set's
  recorded settings is trained again (our reading; see `committee_labeller`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..engine.runtime import resolve_device
from ..engine.stacked import StackTraining
from ..errors import ConfigError
from ..registry import NonNegativeInt, Positive, PositiveInt, UnitInterval
from .augment import DSA, DSA_STRATEGY
from .base import EvalProtocol, SyntheticSet, build_network
from .evaluate import EvalOptions, EvalResult, accuracy, evaluate_synthetic, train_networks
from .observer import has_saved_teacher, observer_from_meta, soft_targets
from .soft_labels import HOLDOUT_FRACTION, committee_members, vote
from .space import pixel_tensors, split_tensors

# ddranking's learning rates for the random subset (_hyper_param_search_for_hard_label / _soft_label).
REFERENCE_LR_GRID = (0.001, 0.005, 0.01, 0.05, 0.1)
DEFAULT_WEIGHT = 0.5  # compute_metrics(lrs_lambda=0.5), ars_lambda=0.5; "w = 0.5 on the leaderboard"

Labeller = Callable[[torch.Tensor], torch.Tensor]  # network inputs -> (N, classes) label distributions


# --- the formulas (accuracies in %) ---------------------------------------------------------------------

def hard_label_recovery(real_hard: float, syn_hard: float) -> float:
    """HLR = Acc(real, hard) - Acc(syn, hard), in % points; lower is better."""
    return real_hard - syn_hard


def improvement_over_random(syn_any: float, random_any: float) -> float:
    """IOR = Acc(syn, any) - Acc(random, any), in % points; higher is better."""
    return syn_any - random_any


def normalised_score(exponent: float) -> float:
    """``(e^x - e^-1) / (e - e^-1)`` in %: maps x in [-1, 1] onto [0, 100] (LRS and ARS)."""
    return 100.0 * (math.exp(exponent) - math.exp(-1.0)) / (math.exp(1.0) - math.exp(-1.0))


def _check_weight(weight: float, name: str) -> None:
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"ddranking.{name}: must be in [0, 1], got {weight}")


def label_robust_score(hlr: float, ior: float, weight: float = DEFAULT_WEIGHT) -> float:
    """LRS in %: ``alpha = w IOR - (1 - w) HLR`` with HLR and IOR as fractions, then `normalised_score`."""
    _check_weight(weight, "weight")
    return normalised_score(weight * ior / 100.0 - (1.0 - weight) * hlr / 100.0)


def augmentation_robust_score(with_augment_gain: float, without_augment_gain: float,
                              weight: float = DEFAULT_WEIGHT) -> float:
    """ARS in %: ``beta = g (syn - random, augmented) + (1 - g) (syn - random, not augmented)`` (gains in %
    points, used as fractions), then `normalised_score`."""
    _check_weight(weight, "augmentation_weight")
    return normalised_score(weight * with_augment_gain / 100.0 + (1.0 - weight) * without_augment_gain / 100.0)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (``np.std``), as the package summarises its rounds."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# --- the pieces the formulas need -------------------------------------------------------------------------

def class_major_hard_labels(synthetic: SyntheticSet, num_classes: int) -> torch.Tensor:
    """The hard labels a set is evaluated with for HLR: its own when hard; for soft labels the class each
    image was distilled for, class by class (``ones(ipc) * i`` for every class i, as the package builds them),
    which needs a class-major set of ``num_classes x ipc`` images."""
    if not synthetic.soft:
        return synthetic.labels.long()
    count = len(synthetic.labels)
    if count % num_classes:
        raise ConfigError(f"ddranking: a soft-label set needs num_classes x ipc images in class order, got {count} "
                          f"images for {num_classes} classes")
    return torch.arange(num_classes).repeat_interleave(count // num_classes)


def random_real_subset(labels: torch.Tensor, per_class: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``per_class[c]`` real images of every class c, drawn without replacement with `generator`,
    class by class (the package: ``random.sample(indices_of_class, ipc)`` for every class)."""
    chosen = []
    for c, wanted in enumerate(per_class.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        if wanted > len(members):
            raise ConfigError(f"ddranking: class {c} has {len(members)} training images, the set {wanted}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:wanted]])
    return torch.cat(chosen)


@dataclass
class DDRankingOptions:
    """How `ddranking_scores` evaluates.  `evaluation`: the networks and training of every run (as
    `evaluate_synthetic`; its `num_models` is replaced by `rounds`).  `rounds`: the package's ``num_eval``, each
    one network on the set and one on a fresh random subset.  `weight`: LRS's w (``lrs_lambda``).  The full-data
    accuracy (% , one number or one per architecture) is `real_accuracy`, else trained as the module docstring
    says and kept in memory and in `cache_file` (JSON) if given.  `lr_grid`: the package's learning-rate search
    (`REFERENCE_LR_GRID`).  `augmentation_robust`: also ARS (two more runs without augmentation)."""

    evaluation: EvalOptions = field(default_factory=EvalOptions)
    rounds: PositiveInt = 5
    weight: UnitInterval = DEFAULT_WEIGHT
    real_accuracy: Optional[Union[float, dict[str, float]]] = None
    real_epochs: PositiveInt = 20
    real_models: PositiveInt = 1
    real_lr: Positive = 0.01
    real_batch_size: PositiveInt = 256
    lr_grid: Optional[list[Positive]] = None
    seed: NonNegativeInt = 0
    augmentation_robust: bool = False
    augmentation_weight: UnitInterval = DEFAULT_WEIGHT
    cache_file: Optional[str] = None
    soft_labeller: Optional[Labeller] = None


# Options a command line may set (`evaluation` comes from eval.*, `soft_labeller` is code).
CLI_OPTIONS = tuple(f.name for f in dataclasses.fields(DDRankingOptions) if f.name not in ("evaluation", "soft_labeller"))


@dataclass
class DDRankingScores:
    """One architecture's accuracies (%, one per round) and DD-Ranking scores (per round; `summary` gives the
    mean and std).  ``syn_any`` is the plain accuracy of the set under its own labels and protocol."""

    model: str
    soft: bool
    real_hard: float
    syn_hard: list[float]
    syn_any: list[float]
    random_any: list[float]
    hlr: list[float]
    ior: list[float]
    lrs: list[float]
    syn_no_augment: list[float] = field(default_factory=list)
    random_no_augment: list[float] = field(default_factory=list)
    ars: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, tuple[float, float]]:
        """(mean, std) of every per-round list that is filled."""
        return {name: mean_std(values) for name, values in self.to_dict().items()
                if isinstance(values, list) and values}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Run:
    """Where and how quietly the runs train."""

    data: object
    device: torch.device
    progress: bool


def _accuracies(subject: SyntheticSet, evaluation: EvalOptions, lrs: Sequence[Optional[float]], run: _Run
                ) -> dict[str, list[float]]:
    """Per architecture, every network's test accuracy (%); with several learning rates the best one per
    network (the package keeps the best of its search)."""
    best: dict[str, list[float]] = {}
    for lr in lrs:
        options = dataclasses.replace(evaluation, lr=lr) if lr is not None else evaluation
        results = evaluate_synthetic(subject, run.data, options, device=str(run.device), progress=run.progress)
        for name, result in results.items():
            previous = best.get(name)
            best[name] = result.accuracies if previous is None else [max(a, b) for a, b in
                                                                     zip(previous, result.accuracies)]
    return best


def _train_split(synthetic: SyntheticSet, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split in the set's space: pixels when the set has an input space, network inputs if not."""
    if synthetic.space is None:
        return split_tensors(data.train)
    pixels, labels, _ = pixel_tensors(data.train)
    return pixels, labels


def _real_key(synthetic: SyntheticSet, data, name: str, evaluation: EvalOptions, options: DDRankingOptions) -> str:
    model_options = evaluation.model_options if evaluation.model_options is not None else (
        synthetic.meta.get("model_options") if name == synthetic.meta.get("model", "convnet:convnet3") else None)
    space = synthetic.space.meta() if synthetic.space is not None else None
    return json.dumps([getattr(data, "name", "?"), len(data.train), name, model_options, space, options.real_epochs,
                       options.real_lr, options.real_batch_size, options.real_models], sort_keys=True, default=repr)


_REAL_ACCURACY_CACHE: dict[str, float] = {}


def real_hard_accuracy(synthetic: SyntheticSet, models: list[str], options: DDRankingOptions, run: _Run
                       ) -> dict[str, float]:
    """Acc(real, hard) per architecture (%): `options.real_accuracy`, the cache, or `real_models` networks trained
    on the whole training split (same architecture and input space as the set; no augmentation)."""
    given = options.real_accuracy
    if isinstance(given, dict):
        missing = [m for m in models if m not in given]
        if missing:
            raise ConfigError(f"ddranking.real_accuracy: no value for {missing[0]!r}")
        return {m: float(given[m]) for m in models}
    if given is not None:
        return {m: float(given) for m in models}
    cache_path = Path(options.cache_file) if options.cache_file else None
    if cache_path is not None and cache_path.is_file():
        _REAL_ACCURACY_CACHE.update(json.loads(cache_path.read_text()))
    found, real = {}, None
    for name in models:
        key = _real_key(synthetic, run.data, name, options.evaluation, options)
        if key not in _REAL_ACCURACY_CACHE:
            if real is None:
                images, labels = _train_split(synthetic, run.data)
                # the full split trains with plain SGD and hard labels whatever the set's own protocol
                meta = dict(synthetic.meta, eval=dataclasses.asdict(EvalProtocol()))
                real = SyntheticSet(images, labels, meta=meta, space=synthetic.space)
            evaluation = dataclasses.replace(options.evaluation, models=[name], num_models=options.real_models,
                                             epochs=options.real_epochs, lr=options.real_lr, augment=False,
                                             batch_size=options.real_batch_size, flip_batch=False,
                                             teacher_labels="none")
            result = evaluate_synthetic(real, run.data, evaluation, device=str(run.device), progress=run.progress)
            _REAL_ACCURACY_CACHE[key] = result[name].mean
        found[name] = _REAL_ACCURACY_CACHE[key]
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(_REAL_ACCURACY_CACHE, indent=1))
    return found


def committee_labeller(synthetic: SyntheticSet, data, device: torch.device, progress: bool = False) -> Labeller:
    """Soft labels for real images as the set's own were made (our reading: the committee is not saved with the
    set, so one with its recorded settings is trained again): `committee_size` networks of the `committee`
    architectures trained `committee_epochs` on the training split minus a held-out tenth, their softmax at
    `label_temperature` voted with weights proportional to held-out accuracy (`soft_labels.vote`)."""
    recorded = synthetic.meta.get("options", {})
    spec, size = recorded.get("committee", "convnet:convnet3"), int(recorded.get("committee_size", 5))
    epochs, temperature = int(recorded.get("committee_epochs", 30)), float(recorded.get("label_temperature", 1.0))
    own, own_options = synthetic.meta.get("model", "convnet:convnet3"), synthetic.meta.get("model_options")
    images, labels = _train_split(synthetic, data)
    inputs = (synthetic.space.to_input(images) if synthetic.space is not None else images).to(device)
    labels = labels.to(device)
    order = torch.randperm(len(labels), device=device)
    held = max(1, int(len(order) * HOLDOUT_FRACTION))
    held_out, train = order[:held], order[held:]
    dsa = DSA(synthetic.meta.get("dsa_strategy") or DSA_STRATEGY)
    members, scores = [], []
    for name, count in committee_members(spec, size):
        networks = [build_network(name, data.num_classes, inputs.shape[1], inputs.shape[2:],
                                  own_options if name == own else None, device) for _ in range(count)]
        trained = train_networks(networks, inputs[train], labels[train],
                                 StackTraining(epochs, decay_epoch=epochs // 2), augment=dsa,
                                 progress=f"ddranking committee {name}" if progress else None)
        members.append(trained)
        scores.append(accuracy(trained, inputs[held_out], labels[held_out]))

    def label(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probabilities = [torch.softmax(m.predict(x.to(device)) / temperature, -1) for m in members]
            return vote(torch.cat(probabilities), torch.cat(scores)).cpu()

    return label


def teacher_labeller(synthetic: SyntheticSet, device: torch.device) -> Optional[Labeller]:
    """Soft labels for real images from the set's own teacher at its protocol's temperature (INFER's static labels
    are that teacher's softmax on the un-augmented images); None when the set has no teacher."""
    if synthetic.teacher is None and not has_saved_teacher(synthetic.meta):
        return None
    teacher = synthetic.teacher if synthetic.teacher is not None else observer_from_meta(synthetic.meta, device)
    temperature = EvalProtocol(**synthetic.meta.get("eval", {})).temperature

    def label(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([soft_targets(teacher.to(device), part.to(device), temperature).cpu()
                              for part in x.split(1024)])

    return label


def _random_subject(synthetic: SyntheticSet, real: tuple[torch.Tensor, torch.Tensor], per_class: torch.Tensor,
                    generator: torch.Generator, labeller: Optional[Labeller]) -> SyntheticSet:
    """A random real subset (same count per class as the set) as a set in the synthetic set's space and protocol,
    hard-labelled, or soft-labelled by `labeller` (network inputs -> distributions)."""
    images, labels = real
    index = random_real_subset(labels, per_class, generator)
    chosen, targets = images[index], labels[index]
    if labeller is not None:
        targets = labeller(synthetic.space.to_input(chosen) if synthetic.space is not None else chosen)
    meta = {**synthetic.meta, "ddranking_random_subset": True}
    return SyntheticSet(chosen, targets, learned_lr=None, meta=meta, space=synthetic.space, teacher=synthetic.teacher)


def teacher_relabelled(synthetic: SyntheticSet, evaluation: EvalOptions) -> bool:
    """Whether the set's protocol trains on a teacher's soft labels of every batch (SRe2L, RDED, ...): then its
    "any labels" runs and the random subsets use that teacher, and the hard-label runs switch it off."""
    mode = evaluation.teacher_labels or synthetic.meta.get("eval", {}).get("teacher_labels", "none")
    return mode != "none"


def ddranking_scores(synthetic: SyntheticSet, data, options: Optional[DDRankingOptions] = None, *,
                     device: str = "auto", progress: bool = False) -> dict[str, DDRankingScores]:
    """HLR, IOR and LRS (and ARS) of a synthetic set, per evaluated architecture.

    Runs, each `options.rounds` networks: the set with hard labels (HLR); the set under its own labels (IOR; the
    same run as the first for a hard-label set); per round a fresh random real subset with as many images per
    class as the set, under the same labels (the set's soft-label committee for a soft set) and protocol; the
    full training split with hard labels (`real_hard_accuracy`).  `ARS` adds the set and the subsets without
    augmentation."""
    options = options or DDRankingOptions()
    torch_device = resolve_device(device)
    run = _Run(data, torch_device, progress)
    num_classes = synthetic.meta.get("num_classes", data.num_classes)
    models = list(options.evaluation.models or [synthetic.meta.get("model", "convnet:convnet3")])
    evaluation = dataclasses.replace(options.evaluation, models=models, num_models=options.rounds)
    hard = class_major_hard_labels(synthetic, num_classes)
    grid = list(options.lr_grid) if options.lr_grid else [None]
    searches_syn = grid if synthetic.learned_lr is None else [None]  # the package searches without a given lr
    devices = [torch_device] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(options.seed)
        hard_set = dataclasses.replace(synthetic, labels=hard)
        relabelled = teacher_relabelled(synthetic, options.evaluation)
        hard_only = dataclasses.replace(evaluation, teacher_labels="none")
        syn_hard = _accuracies(hard_set, hard_only, grid if synthetic.soft or relabelled else searches_syn, run)
        syn_any = (_accuracies(synthetic, evaluation, searches_syn, run) if synthetic.soft or relabelled
                   else syn_hard)
        labeller = None
        if synthetic.soft:
            labeller = (options.soft_labeller or teacher_labeller(synthetic, torch_device)
                        or committee_labeller(synthetic, data, torch_device, progress))
        real = _train_split(synthetic, data)
        per_class = torch.bincount(hard, minlength=num_classes)
        one_each = dataclasses.replace(evaluation, num_models=1)
        generator = torch.Generator().manual_seed(options.seed)  # one stream: round r takes the r-th draw
        subjects = [_random_subject(synthetic, real, per_class, generator, labeller) for _ in range(options.rounds)]
        random_any = _per_round(subjects, one_each, grid, run)
        no_augment = {}
        if options.augmentation_robust:
            plain = dataclasses.replace(evaluation, augment=False)
            no_augment["syn"] = _accuracies(synthetic, plain, searches_syn, run)
            no_augment["random"] = _per_round(subjects, dataclasses.replace(plain, num_models=1), grid, run)
        real_hard = real_hard_accuracy(synthetic, models, options, run)
    return {name: _scores(name, synthetic.soft or relabelled, real_hard[name], syn_hard[name], syn_any[name], random_any[name],
                          {k: v[name] for k, v in no_augment.items()}, options) for name in models}


def random_real_baseline(synthetic: SyntheticSet, data, evaluation: EvalOptions, *, seed: int = 0,
                         device: str = "auto", progress: bool = False) -> dict[str, EvalResult]:
    """Random real images beside a synthetic set, for `kdzoo condense`'s table: `evaluation.num_models` fresh
    random subsets of the training split (as many images per class as the set, `_random_subject`), one network
    each, trained and tested under the set's own protocol (epochs, augmentation, architectures, a teacher that
    relabels every batch) -- DD-Ranking's IOR baseline without its learning-rate search.  Labels: the teacher's
    soft labels when the set has one, else hard labels (also for a soft set without a saved teacher, whose
    committee would have to be trained again: the published random-real rows use hard labels too).  Seeded by
    `seed`, the global random state left as it was.  Per architecture one `EvalResult` (mean, population std)."""
    torch_device = resolve_device(device)
    num_classes = synthetic.meta.get("num_classes", data.num_classes)
    labeller = teacher_labeller(synthetic, torch_device) if synthetic.soft else None
    mode = evaluation.teacher_labels or synthetic.meta.get("eval", {}).get("teacher_labels", "none")
    if mode == "static" and labeller is None:  # stored soft labels mixed with inputs: hard subsets cannot
        evaluation = dataclasses.replace(evaluation, teacher_labels="none")
    if synthetic.soft and len(synthetic.labels) % num_classes:
        per_class = torch.bincount(synthetic.labels.argmax(1), minlength=num_classes)
    else:
        per_class = torch.bincount(class_major_hard_labels(synthetic, num_classes), minlength=num_classes)
    one_each = dataclasses.replace(evaluation, num_models=1)
    found: dict[str, list[EvalResult]] = {}
    devices = [torch_device] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        real = _train_split(synthetic, data)  # reading a generated split may draw random numbers
        generator = torch.Generator().manual_seed(seed)
        for _ in range(evaluation.num_models):
            subject = _random_subject(synthetic, real, per_class, generator, labeller)
            for name, result in evaluate_synthetic(subject, data, one_each, device=str(torch_device),
                                                   progress=progress).items():
                found.setdefault(name, []).append(result)
    merged = {}
    for name, runs in found.items():
        accuracies = [a for r in runs for a in r.accuracies]
        mean, std = mean_std(accuracies)
        merged[name] = EvalResult(name, accuracies, mean, std, runs[0].epochs, runs[0].lr, sum(r.seconds for r in runs))
    return merged


def _per_round(subjects: list[SyntheticSet], evaluation: EvalOptions, grid, run: _Run) -> dict[str, list[float]]:
    """One network per random subset (one subset per round), per architecture."""
    found: dict[str, list[float]] = {}
    for subject in subjects:
        for name, values in _accuracies(subject, evaluation, grid, run).items():
            found.setdefault(name, []).extend(values)
    return found


def _scores(name: str, soft: bool, real_hard: float, syn_hard: list[float], syn_any: list[float],
            random_any: list[float], no_augment: dict[str, list[float]], options: DDRankingOptions
            ) -> DDRankingScores:
    """The per-round formulas on one architecture's accuracies."""
    hlr = [hard_label_recovery(real_hard, s) for s in syn_hard]
    ior = [improvement_over_random(s, r) for s, r in zip(syn_any, random_any)]
    scores = DDRankingScores(name, soft, real_hard, syn_hard, syn_any, random_any, hlr, ior,
                             [label_robust_score(h, i, options.weight) for h, i in zip(hlr, ior)])
    if no_augment:
        scores.syn_no_augment, scores.random_no_augment = no_augment["syn"], no_augment["random"]
        scores.ars = [augmentation_robust_score(gain, s - r, options.augmentation_weight)
                      for gain, s, r in zip(ior, scores.syn_no_augment, scores.random_no_augment)]
    return scores


def format_ddranking(scores: dict[str, DDRankingScores], method: str, dataset: str, ipc: int) -> str:
    """A plain-text table: the plain accuracy (the set under its own labels) beside HLR, IOR, LRS (and ARS),
    every column mean ± std over the rounds."""
    with_ars = any(s.ars for s in scores.values())
    header = ["method", "dataset", "ipc", "model", "labels", "rounds", "accuracy %", "random %", "real-hard %",
              "HLR", "IOR", "LRS %"] + (["ARS %"] if with_ars else [])
    rows = [tuple(header)]
    for name, s in scores.items():
        summary = {key: "{:.2f} ± {:.2f}".format(*value) for key, value in s.summary().items()}
        row = [method, dataset, str(ipc), name, "soft" if s.soft else "hard", str(len(s.syn_any)), summary["syn_any"],
               summary["random_any"], f"{s.real_hard:.2f}", summary["hlr"], summary["ior"], summary["lrs"]]
        rows.append(tuple(row + ([summary.get("ars", "-")] if with_ars else [])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


__all__ = ["hard_label_recovery", "improvement_over_random", "label_robust_score", "augmentation_robust_score",
           "normalised_score", "mean_std", "class_major_hard_labels", "random_real_subset", "DDRankingOptions",
           "DDRankingScores", "ddranking_scores", "random_real_baseline", "real_hard_accuracy", "committee_labeller",
           "format_ddranking",
           "REFERENCE_LR_GRID", "CLI_OPTIONS"]
