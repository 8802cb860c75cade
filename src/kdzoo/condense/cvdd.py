"""CV-DD: dataset distillation via committee voting (Cui, Li, Ma, Bi, Luo & Shen 2025).

What the paper does: SRe2L's squeeze / recover / relabel with a COMMITTEE of observers.  Several networks are
squeezed on the real data; each IPC index is recovered against a few of them ("voters"), the per-network
SRe2L losses weighted by a softmax of the networks' prior performance; the evaluation relabels every batch with
the whole committee's weighted logits, each member normalising with the statistics of the batch it labels
("batch-specific soft labelling", BSSL: the teachers run in train mode).

Reference code read: github.com/Jiacheng8/CV-DD, ``recover/recover.py`` + ``recover/utils_recover.py``
(`load_recover_model`: the voter weights), ``recover/scripts/*/recover_voter_ipc{1,10,50}.sh`` and
``constants.sh``, ``relabel/relabel.py`` (`save`: the committee's labels) with
``relabel/scripts/*/relabel_voter_res18_ipc*.sh``, ``validate/train_fkd.py`` with
``validate/scripts/*/voter_ipc*_r18.sh``.

How their code combines the members, and how we do:
  * recover (recover.py, utils_recover.load_recover_model with --voter-type prior): the voters of an IPC index
    get weights w = softmax(prior / 5) (``--weight-temperature`` 5, priors in %), and the loss of a step is
    sum_i w_i (CE_i + r_bn BN_i) over the voters, every voter seeing the same augmented batch (SRe2L's loss per
    voter, `sre2l.committee_recover_loss`);
  * which voters (``--model-setting``, ``--selected-size 2``): IPC 1 a fixed pair (``top``: the `voters` best
    priors; their CIFAR scripts hand-pick the pair), IPC 10 the 10 pairs of the 5 members in
    itertools.combinations order, pair i for IPC index i (``pairs``), IPC 50 a random pair per IPC index
    (``random``);
  * relabel (relabel.py `save`): EVERY member labels, logits combined as sum_i w_i z_i with
    w = softmax(prior / 10) (its hard-coded temperature 10), i.e. a weighted LOGIT average, not a probability
    vote; train_fkd.py then takes softmax(. / T) at T = 20.  The teachers are never put in eval mode (BSSL):
    BatchNorm uses the statistics of the batch, and relabel.py feeds each batch in two halves
    (``images[:split]``, ``images[split:]``, split = batch // 2), each half normalised by its own statistics.
    `Committee` does exactly that for the batch it is given (BatchNorm layers on batch statistics without
    touching the running statistics; other layers in eval mode, their members have no dropout);
  * the rest of recover is SRe2L's (`sre2l.SRe2L`: per-batch Adam (0.5, 0.9) with cosine lr, clipping), with the
    CV-DD scripts' values for every dataset: 4000 iterations per batch, lr 0.25, r_bn 0.01, first-BN x10,
    100 classes per batch (all 10 for 10-class sets), RandomResizedCrop + flip on (``--apply-data-augmentation``)
    and a roll in [0, jitter], jitter 4 (CIFAR, Tiny-ImageNet) or 32 (ImageNet).

Evaluation (`EVAL`, validate/scripts/*/voter_ipc*_r18.sh + train_fkd.py): 300 epochs, batch 16, AdamW lr 1e-3
(their ResNet-18/50 students) weight decay 0.01, crops of scale (0.08, 1) + flip + CutMix, T = 20; the cosine
runs over E epochs, or over 2E (``eta`` 2: our ``half_cosine``) for CIFAR-100 IPC 10, Tiny-ImageNet IPC 1/50 and
ImageNet-1K IPC 1/10 (`CVDD_SCHEDULES`).

What is OUR reading / not implemented:
  * the committee: the observer (`observer*` options) is member 0; members 1..committee_size-1 are spread
    round-robin over the `committee` architectures (default: the observer's) with seeds seed+1, seed+2, ...
    The authors' committee is five architectures (ResNet-18, ResNet-50, ShuffleNetV2, MobileNetV2, DenseNet-121);
    pass e.g. committee=cifar:ResNet50,cifar:ShuffleV2,cifar:mobile_half for a mixed zoo committee;
  * the priors: the authors' ``model_prior_weight_dict`` holds a number per architecture and dataset (e.g.
    CIFAR-10: ResNet-18 63, ResNet-50 65.3, ShuffleNetV2 68.5, MobileNetV2 67.6, DenseNet-121 67.4), reported in
    % of accuracy.  Ours: each member's top-1 % on a held-out tenth of the training images (all members are
    squeezed on the other nine tenths), or the numbers given in `committee_priors`;
  * the initialisation: the authors start from real-image patches (``--initialisation-method Patches``, files
    made beforehand); ours: random real images of each class (init=real), or Gaussian noise (init=noise, their
    other choice);
  * the evaluation relabels, with BSSL, the batch the evaluation hands the teacher: one network's batch when
    networks are trained one by one; if the evaluation labels several stacked networks' batches in one call,
    the statistics are those of that larger batch.  train_fkd.py's gradient accumulation (2 x 8 images per
    step) is trained as one batch of 16.
"""
from __future__ import annotations

import dataclasses
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Optional

import torch
from torch import nn

from ..engine.stacked import StackedModels, StackTraining
from ..errors import ConfigError
from ..models.weights import load_weights
from ..registry import NonNegativeInt, Positive, PositiveInt, register_condenser
from .base import EvalProtocol, jsonable, nearest_ipc
from .decoupled import SOFT_LABEL_EVAL
from .evaluate import accuracy, train_networks
from .observer import (ObserverSpec, frozen, load_observer, new_observer, read_saved_observer, register_teacher_loader,
                       save_observer)
from .soft_labels import HOLDOUT_FRACTION, committee_members
from .sre2l import RecoverSettings, SRe2L, table_row

CVDD_PAPER = "Cui et al. 2025, Dataset Distillation via Committee Voting (arXiv 2501.07575)"

# recover/scripts/*/recover_voter_ipc*.sh (+ constants.sh bs, recover.py's per-dataset jitter).
CVDD_SETTINGS = {
    "imagenet1k": RecoverSettings(4000, 0.25, 0.01, 10.0, 100, True, 32, False),
    "tinyimagenet": RecoverSettings(4000, 0.25, 0.01, 10.0, 100, True, 4, False),
    "cifar100": RecoverSettings(4000, 0.25, 0.01, 10.0, 100, True, 4, False),
    "cifar10": RecoverSettings(4000, 0.25, 0.01, 10.0, 10, True, 4, False),
}
# --model-setting of the voter scripts by IPC: 4 (IPC 1), 5 (IPC 10), 3 (IPC 50).
VOTER_SELECTION = {1: "top", 10: "pairs", 50: "random"}
VOTER_SELECTIONS = ("top", "pairs", "random")
RECOVER_WEIGHT_TEMPERATURE = 5.0  # recover.py --weight-temperature
LABEL_WEIGHT_TEMPERATURE = 10.0  # relabel.py `save`: temperature = 10

CVDD_EVAL = dataclasses.replace(SOFT_LABEL_EVAL, epochs=300, batch_size=16, lr=1e-3, temperature=20.0,
                                mix="cutmix", crop_scale=(0.08, 1.0), schedule="cosine")
# train_fkd.py's eta for the ResNet-18 student: 1 -> cosine over the epochs, 2 -> half_cosine.
CVDD_SCHEDULES = {
    "cifar10": {1: "cosine", 10: "cosine", 50: "cosine"},
    "cifar100": {1: "cosine", 10: "half_cosine", 50: "cosine"},
    "tinyimagenet": {1: "half_cosine", 10: "cosine", 50: "half_cosine"},
    "imagenet1k": {1: "half_cosine", 10: "half_cosine", 50: "cosine"},
}


# --- the math --------------------------------------------------------------------------------------------------


def prior_weights(priors: torch.Tensor, temperature: float) -> torch.Tensor:
    """CV-DD's prior-performance weights: softmax(priors / T) over the members (priors in %; T = 5 for the
    recover loss, 10 for the labels).  In float64, as their numpy computes them."""
    return torch.softmax(priors.double() / temperature, 0)


def committee_logits(member_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(members, images, classes) logits -> sum_i w_i z_i: relabel.py's weighted sum of the members' logits."""
    return (weights.to(member_logits).view(-1, 1, 1) * member_logits).sum(0)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every BatchNorm layer of `model` normalises with the statistics of its input batch (the
    train-mode forward of BSSL) and leaves its running statistics untouched; other layers keep their mode."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(layer.training, layer.track_running_stats) for layer in layers]
    try:
        for layer in layers:
            layer.training, layer.track_running_stats = True, False
        yield model
    finally:
        for layer, (training, tracking) in zip(layers, saved):
            layer.training, layer.track_running_stats = training, tracking


def batch_specific_logits(member: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A member's logits of one batch as relabel.py computes them: the two halves x[:n//2] and x[n//2:] each
    normalised by their own BatchNorm statistics."""
    halves = [part for part in (x[:len(x) // 2], x[len(x) // 2:]) if len(part)]
    with batch_statistics(member):
        return torch.cat([member(part) for part in halves])


class Committee(nn.Module):
    """CV-DD's relabelling committee: `forward(x)` = sum_i w_i z_i(x), the weighted logits of every member (each
    with batch-specific BatchNorm statistics when `batch_specific`, else running statistics); `soft_labels(x, T)`
    = softmax(forward(x) / T), the labels the evaluation trains on (`observer.soft_targets`)."""

    def __init__(self, members: list[nn.Module], weights: torch.Tensor, batch_specific: bool = True):
        super().__init__()
        if len(members) != len(weights):
            raise ConfigError(f"committee: {len(members)} members but {len(weights)} weights")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", weights.detach().clone().float())
        self.batch_specific = batch_specific

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(members, images, classes)."""
        if self.batch_specific:
            return torch.stack([batch_specific_logits(member, x) for member in self.members])
        return torch.stack([member(x) for member in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return committee_logits(self.member_logits(x), self.weights)

    def soft_labels(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax(self.forward(x).float() / temperature, -1)


def voter_schedule(selection: str, priors: torch.Tensor, voters: int, ipc: int, seed: int) -> list[tuple[int, ...]]:
    """The members recovering each IPC index: ``top`` the `voters` best priors (every index), ``pairs`` the
    itertools.combinations of the members in order (index i takes combination i, cycling), ``random`` a uniform
    draw of `voters` members per index (from a generator seeded with `seed`, so a resumed run draws the same)."""
    members = len(priors)
    if selection == "top":
        best = sorted(range(members), key=lambda i: (-float(priors[i]), i))[:voters]
        return [tuple(sorted(best))] * ipc
    if selection == "pairs":
        combinations = list(itertools.combinations(range(members), voters))
        return [combinations[i % len(combinations)] for i in range(ipc)]
    generator = torch.Generator().manual_seed(seed)
    return [tuple(sorted(torch.randperm(members, generator=generator)[:voters].tolist())) for _ in range(ipc)]


# --- the trained committee -------------------------------------------------------------------------------------


@dataclass
class TrainedCommittee:
    """The members (frozen, eval mode), their priors (%) and their descriptions for the set's metadata."""

    networks: list[nn.Module]
    priors: torch.Tensor
    descriptions: list[dict[str, Any]]


def member_file(observer_file: str | Path, index: int) -> Path:
    """``OUT/observer.safetensors`` -> ``OUT/observer-member<index>.safetensors``."""
    path = Path(observer_file)
    return path.with_name(f"{path.stem}-member{index}{path.suffix or '.safetensors'}")


def committee_from_meta(meta: dict[str, Any], device: torch.device) -> Committee:
    """The relabelling committee a CV-DD set's metadata records (``meta["observer"]["committee"]``), loaded from
    its member files, for `evaluate_synthetic` (hooked into `observer.observer_from_meta`)."""
    recorded = (meta.get("observer") or {}).get("committee")
    if not recorded:
        raise ConfigError("this set records no committee (meta['observer']['committee']); it was not made by cv_dd")
    networks, priors = [], []
    for index, member in enumerate(recorded["members"]):
        if member.get("source") == "pretrained":
            spec = ObserverSpec("pretrained", member["model"], member.get("options"), member["num_classes"],
                                member["in_channels"], tuple(member["image_size"]))
            networks.append(load_observer(spec, device))
            priors.append(float(member["prior"]))
            continue
        path = member.get("file")
        if not path or not Path(path).is_file():
            raise ConfigError(f"the set's committee member {index} file {path!r} is missing; run cv_dd with "
                              "observer_file=PATH (the CLI's OUT/observer.safetensors) and keep the member files, "
                              "or pass teacher=MODEL to evaluate_synthetic")
        spec = ObserverSpec(str(path), member["model"], member.get("options"), member["num_classes"],
                            member["in_channels"], tuple(member["image_size"]))
        network = new_observer(spec, device)
        load_weights(network, path, what=f"committee member {index}")
        networks.append(frozen(network))
        priors.append(float(member["prior"]))
    weights = prior_weights(torch.tensor(priors), float(recorded["label_weight_temperature"]))
    return Committee(networks, weights, bool(recorded["batch_specific"])).to(device)


# --- the condenser ---------------------------------------------------------------------------------------------


@register_condenser("cv_dd", paper=CVDD_PAPER,
                    scope="committee recover (prior-weighted BN/CE losses) and per-batch committee relabelling as in Jiacheng8/CV-DD; ours: members are seeds (or committee= architectures) trained here, priors are held-out accuracies, init from random real images")
@dataclass(eq=False)
class CVDD(SRe2L):
    """SRe2L's per-batch recover against a committee's voters, relabelled per batch by the whole committee (see
    the module docstring).  Options left None take the authors' value for the dataset and IPC.

    Options:
        committee: architectures of members 1.. (comma-separated, round-robin); None: the observer's
        committee_size: members including the observer (the authors' five)
        committee_epochs: squeeze epochs of members 1..; None: observer_epochs
        committee_priors: prior accuracy % of each member (their model_prior_weight_dict); None: held-out accuracy
        voters: members recovering each IPC index (--selected-size)
        voter_selection: top | pairs | random (which voters per IPC index); None: by IPC as their scripts
        recover_weight_temperature: T of the voters' loss weights softmax(prior / T) (--weight-temperature)
        label_weight_temperature: T of the labelling weights softmax(prior / T) (relabel.py's 10)
        batch_specific_labels: members label with batch statistics, per half batch (BSSL)
        iterations: Adam steps of the whole schedule to run (as sre2l); None: all
        batch_iterations: Adam steps per batch (--iteration)
        lr_img: Adam learning rate of the images (--lr), cosine-decayed within each batch
        r_bn: weight of the BatchNorm-statistics loss (--r-bn)
        first_bn_multiplier: extra weight of the first BatchNorm layer (--first-bn-multiplier)
        class_batch: classes recovered together, one image of each (--batch-size)
        random_crop: RandomResizedCrop + flip of the batch before the roll (--apply-data-augmentation)
        jitter: largest random roll in pixels (--jitter)
        jitter_signed: rolls from [-jitter, jitter] instead of [0, jitter]
    """

    init: str = "real"
    committee: Optional[str] = None
    committee_size: PositiveInt = 5
    committee_epochs: Optional[NonNegativeInt] = None
    committee_priors: Optional[list[float]] = None
    voters: PositiveInt = 2
    voter_selection: Optional[Literal["top", "pairs", "random"]] = None
    recover_weight_temperature: Positive = RECOVER_WEIGHT_TEMPERATURE
    label_weight_temperature: Positive = LABEL_WEIGHT_TEMPERATURE
    batch_specific_labels: bool = True

    EVAL: ClassVar[EvalProtocol] = CVDD_EVAL
    SETTINGS: ClassVar[dict[str, RecoverSettings]] = CVDD_SETTINGS

    def resolve_options(self) -> None:
        name = self.registry_name
        if self.committee_labels:
            raise ConfigError(f"{name}: committee_labels (fixed labels) does not apply; cv_dd's committee relabels "
                              "every batch of the evaluation")
        if self.voters > self.committee_size:
            raise ConfigError(f"{name}: voters={self.voters} is more than committee_size={self.committee_size}")
        if self.committee_priors is not None and len(self.committee_priors) != self.committee_size:
            raise ConfigError(f"{name}: committee_priors has {len(self.committee_priors)} values for "
                              f"committee_size={self.committee_size} members")
        if self.voter_selection is not None and self.voter_selection not in VOTER_SELECTIONS:
            raise ConfigError(f"{name}: voter_selection must be one of {', '.join(VOTER_SELECTIONS)}, "
                              f"got {self.voter_selection!r}")
        if self.committee is None:
            self.committee = self.observer_model
        if self.committee_size > 1:
            committee_members(self.committee, self.committee_size - 1)  # a clear error for an empty list
        if self.committee_epochs is None:
            self.committee_epochs = self.observer_epochs
        if self.voter_selection is None:
            self.voter_selection = nearest_ipc(VOTER_SELECTION, self.ipc)
        super().resolve_options()

    # -- the committee ----------------------------------------------------------------------------------------
    def member_specs(self) -> list[ObserverSpec]:
        """Member 0: the observer; then the `committee` architectures round-robin (the observer's own
        architecture with the observer's options, a ConvNet with BatchNorm, others with their defaults)."""
        specs = [self.observer_spec()]
        if self.committee_size > 1:
            for arch, count in committee_members(self.committee, self.committee_size - 1):
                if arch == self.observer_model:
                    options = self.observer_spec().options
                else:
                    options = {"norm": "batchnorm"} if arch.startswith("convnet:") else None
                spec = ObserverSpec("squeeze", arch, options, self.num_classes, self.channels, self.image_size)
                specs += [spec] * count
        return specs

    def holdout_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(training rows, held-out rows) of the real images: a seeded tenth is held out for the priors."""
        count = len(self.real.labels)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed)).to(self.torch_device)
        held = max(1, int(count * HOLDOUT_FRACTION))
        return order[held:], order[:held]

    def member_meta(self, index: int, spec: ObserverSpec, train_rows: torch.Tensor) -> dict[str, Any]:
        """What member `index` depends on: a saved member is reused only when all of it matches."""
        epochs = self.observer_epochs if index == 0 else self.committee_epochs
        return {**self.observer_meta(), **spec.meta(), "member": index, "epochs": epochs, "seed": self.seed + index,
                "train_images": len(train_rows), "holdout_seed": self.seed, "holdout_fraction": HOLDOUT_FRACTION}

    def train_member(self, spec: ObserverSpec, meta: dict[str, Any], train_rows: torch.Tensor) -> nn.Module:
        """Squeeze one member on the training rows (the observer's recipe, its own seed)."""
        device = self.torch_device
        if meta["epochs"] < 1:
            raise ConfigError(f"{self.registry_name}: squeezing committee member {meta['member']} needs "
                              f"{'observer_epochs' if meta['member'] == 0 else 'committee_epochs'} >= 1")
        settings = StackTraining(meta["epochs"], self.observer_lr, batch_size=self.observer_batch,
                                 decay_epoch=meta["epochs"] // 2)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(meta["seed"])
            network = new_observer(spec, device)
            progress = f"committee member {meta['member']} {spec.model}" if self.progress else None
            stack = train_networks([network], self.real.images[train_rows], self.real.labels[train_rows], settings,
                                   augment=self.dsa, progress=progress)
            stack.write_back()
        return frozen(network)

    def member_network(self, index: int, spec: ObserverSpec, train_rows: torch.Tensor) -> tuple[nn.Module, dict]:
        """Member `index`, loaded (observer=pretrained/PATH for member 0, or a matching saved file) or squeezed
        (and saved beside `observer_file`); with its description for the set's metadata."""
        description = {**spec.meta(), "member": index}
        if index == 0 and self.observer != "squeeze":  # observer=pretrained or a weights file / run folder
            if self.observer == "pretrained":
                return load_observer(spec, self.torch_device), {**description, "source": "pretrained"}
            path = str(Path(self.observer).resolve())
            return load_observer(spec, self.torch_device), {**description, "source": "path", "file": path}
        meta = self.member_meta(index, spec, train_rows)
        path = member_file(self.observer_file, index) if self.observer_file else None
        network = read_saved_observer(path, spec, meta, self.torch_device) if path else None
        if network is None:
            network = self.train_member(spec, meta, train_rows)
            if path:
                save_observer(path, network, meta)
        if path:
            description["file"] = str(path.resolve())
        return network, {**description, "source": "squeeze", "seed": meta["seed"], "epochs": meta["epochs"]}

    @cached_property
    def trained_committee(self) -> TrainedCommittee:
        """Built on first use (so a run's progress setting applies), then kept; outside the run's random stream
        (loading a saved member draws an initialisation that squeezing one inside its own seed does not)."""
        devices = [self.torch_device] if self.torch_device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self.build_committee()

    def build_committee(self) -> TrainedCommittee:
        train_rows, held_rows = self.holdout_split()
        networks, descriptions = [], []
        for index, spec in enumerate(self.member_specs()):
            network, description = self.member_network(index, spec, train_rows)
            networks.append(network)
            descriptions.append(description)
        if self.committee_priors is not None:
            priors = torch.tensor(self.committee_priors, dtype=torch.float64)
        else:
            held_images, held_labels = self.real.images[held_rows], self.real.labels[held_rows]
            priors = torch.tensor([float(accuracy(StackedModels([n]).eval(), held_images, held_labels)[0]) * 100
                                   for n in networks], dtype=torch.float64)
        for description, prior in zip(descriptions, priors.tolist()):
            description["prior"] = prior
        return TrainedCommittee(networks, priors, descriptions)

    @cached_property
    def observer_network(self) -> nn.Module:
        """Member 0 of the committee."""
        return self.trained_committee.networks[0]

    @cached_property
    def voters_by_ipc(self) -> list[tuple[int, ...]]:
        return voter_schedule(self.voter_selection, self.trained_committee.priors, self.voters, self.ipc, self.seed)

    def recovering_networks(self, ipc_index: int) -> tuple[list[nn.Module], torch.Tensor]:
        chosen = list(self.voters_by_ipc[ipc_index])
        committee = self.trained_committee
        weights = prior_weights(committee.priors[chosen], self.recover_weight_temperature)
        return [committee.networks[i] for i in chosen], weights

    def evaluation_teacher(self) -> Committee:
        """Every member, weighted by softmax(prior / label_weight_temperature), labelling per batch."""
        committee = self.trained_committee
        weights = prior_weights(committee.priors, self.label_weight_temperature)
        return Committee(committee.networks, weights, self.batch_specific_labels)

    def observer_description(self) -> dict[str, Any]:
        """Member 0 as the observer (with its file, if saved) and the whole committee under ``committee``."""
        committee = self.trained_committee
        description = {**self.observer_spec().meta(), "source": self.observer}
        if "file" in committee.descriptions[0]:
            description["file"] = committee.descriptions[0]["file"]
        description["committee"] = {"members": committee.descriptions, "voters": [list(v) for v in self.voters_by_ipc],
                                    "label_weight_temperature": self.label_weight_temperature,
                                    "recover_weight_temperature": self.recover_weight_temperature,
                                    "batch_specific": self.batch_specific_labels}
        return jsonable(description)

    def evaluation_protocol(self) -> EvalProtocol:
        schedules = table_row(CVDD_SCHEDULES, self.data.name, self.image_size)
        return dataclasses.replace(self.EVAL, schedule=nearest_ipc(schedules, self.ipc))


register_teacher_loader("committee", committee_from_meta)


__all__ = ["CVDD", "Committee", "committee_from_meta", "committee_logits", "prior_weights", "batch_statistics",
           "batch_specific_logits", "voter_schedule", "member_file", "CVDD_SETTINGS", "CVDD_EVAL", "CVDD_SCHEDULES"]
