"""INFER: Inter-class Feature compEnsatoR (Zhang, Du, Liu & Zhou, ICLR 2025, "Breaking Class Barriers: Efficient
Dataset Distillation via Inter-Class Feature Compensator").

What the method does.  K groups P_k of real images are drawn at random, each holding one image of every class
(C images).  For every group and every one of M observer architectures a Universal Feature Compensator u_{k,m}
(one image-sized tensor) is learned so that the observer classifies every x + u_{k,m}, x in P_k, as x's class while
the batch's BatchNorm statistics match the observer's running ones (SRe2L's recover loss, but one shared tensor for
all C classes instead of one image per class):

    loss(u_{k,m}) = mean_{x in P_k} CE(f_m(roll(x + u_{k,m})), y_x) + r_bn * (first * R_1 + sum_{l > 1} R_l),
    R_l = ||mu_l(batch) - mu_l^run||_2 + ||var_l(batch) - var_l^run||_2,

`roll` a random cyclic shift of the group by (0..jitter, 0..jitter) pixels.  One UFC thus yields C synthetic
images, one per class, and the training set is P_k plus every x + u_{k,m}: K (M + 1) images per class.

Budget (what `ipc` means here).  `ipc` is the storage budget of ipc x C images.  INFER stores the K C real images
and the K M compensators, each the size of one image, so K = floor(ipc C / (C + M)) (the reference's
``int(ipc / (M / C + 1))``, in integer arithmetic): CIFAR-100, IPC 10, M = 4 gives K = 9, 936 stored images
of the 1000 allowed, and 45 training images per class.  The set's meta["budget"] records the numbers.

Reference code read: github.com/zhangxin-xd/UFC (commit 83d19f8): ufc_generation/ufc_cifar.py (`get_images`, the
`__main__` budget lines), ufc_generation/utils.py (`BNFeatureHook`, `lr_cosine_policy`, `clip_image`),
sh/ufc_cifar.sh and README.md (the CIFAR command lines), ufc_validation/val_static.py and val_dyn.py (evaluation).
Followed from there:
  * K groups of randomly drawn real images, one per class (the README's "randomly sampling from the original
    dataset"; ``tensor_{k}.pt`` holds the C images of group k), the raw groups kept in the set (``ipc_id <
    ipc_init`` runs 0 iterations and saves the images as they are);
  * one UFC per (group, observer), zero-initialised, optimised with that observer only (``model_index = ipc_id //
    ipc_init - 1``), all C classes in one batch (``--batch-size 100`` on CIFAR-100), CE mean over the batch + r_bn
    times the BN term with the first BN layer x10 (``--first-bn-multiplier``), the BN norms not squared;
  * Adam lr 0.25 (the CIFAR and ImageNet commands), betas (0.5, 0.9), eps 1e-8, cosine lr without warm-up over
    1000 iterations (CIFAR command), jitter 4 (argparse default), r_bn 1 (CIFAR command; 0.01 in the ImageNet one:
    our reading applies it to 1000-class data);
  * no clamping while optimising: the reference's `clip_image` writes into ``inputs.data``, a sum recomputed from
    the UFC each iteration, so it never reaches the UFC; the stored images are clamped to [0, 1] pixels
    (`denormalize_image`), here by `final_images`;
  * M = 4 observers; the authors' ResNet-18, MobileNetV2, EfficientNet-B0 and ShuffleNet-G2 (CIFAR variants,
    pre-trained 200 epochs) are not in the zoo: `observer_model` defaults to the zoo's nearest ones,
    ``cifar:resnet20, cifar:mobile_half, convnet:convnet3 (BatchNorm; no EfficientNet in the zoo), cifar:ShuffleV1``,
    squeezed here with the base's recipe (`observer_epochs`), member i with seed ``seed + i``.

Labels and evaluation.  The authors evaluate two ways, both with the M observers' mean logits as teacher, MixUp
(alpha 0.8) on RandomCrop(32, padding 4) + flip batches, KL at T = 30, AdamW lr 1e-3, weight decay 0.01, cosine
per epoch, batch 64:
  * INFER (val_static.py, 400 epochs): the teacher labels each synthetic image once, un-augmented, and a mixed
    batch's target is the same linear interpolation of the two stored logit vectors (the "linear interpolation of
    labels" that keeps the stored soft labels to one vector per image);
  * INFER+Dyn (val_dyn.py, 80 epochs on CIFAR, README: epochs cut by 1 / (M + 1)): the teacher relabels every mixed
    batch.
`EVAL` is INFER's static protocol (``teacher_labels="static"``: the set's stored labels, softmax of the observers'
mean logits / 30 on the final images, mixed in log space with their MixUp partners, which is the softmax of the
interpolated logits); INFER+Dyn is ``eval.teacher_labels=online eval.epochs=80`` (`INFER_DYN_EVAL`).  NOT implemented:
the RandomCrop(padding 4) translation (kdzoo's online crops are RandomResizedCrop; `crop_scale`
(1, 1) keeps the whole image and only flips), AdamW weight decay on every parameter (kdzoo decays conv/linear
weights only), the authors' ResNet-18 student (the set's `model` is what is evaluated), JPEG storage of the images,
the EfficientNet-specific dropped BN hook (``loss_packed_features[2].pop(1)``), and the reference saving x + u from
before its last Adam step (we take the UFC after it; the cosine lr there is ~lr pi^2 / (4 I^2)).

A set made with M > 1 observers records them under meta["observer"]["ensemble"] (their files NAME-member<i> beside
`observer_file`) but no single `file`: until `observer.observer_from_meta` loads such an ensemble
(`ensemble_from_meta` does), evaluating the saved set from disk is refused rather than done with one member; in
process (`condense` + `evaluate_synthetic`, the CLI) the ensemble is attached as `synthetic.teacher`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import NonNegative, NonNegativeInt, Positive, UnitInterval, register_condenser
from .base import EvalProtocol, SyntheticSet, jsonable
from .decoupled import SOFT_LABEL_EVAL, BatchNormStatistics, ObserverCondenser, clamp_to_pixels, cosine_lr, squeeze
from .observer import (SOURCES, ObserverSpec, frozen, load_observer, read_saved_observer, register_teacher_loader,
                       save_observer)

INFER_PAPER = ("Zhang et al. 2025, Breaking Class Barriers: Efficient Dataset Distillation via Inter-Class Feature "
               "Compensator (ICLR)")

# The authors' ResNet-18, MobileNetV2, EfficientNet-B0, ShuffleNet-G2 as the zoo's nearest CIFAR models (see above).
DEFAULT_OBSERVERS = "cifar:resnet20,cifar:mobile_half,convnet:convnet3,cifar:ShuffleV1"
IMAGENET_CLASSES = 1000
R_BN_CIFAR, R_BN_IMAGENET = 1.0, 0.01  # sh/ufc_cifar.sh --r-bn 1; README's ImageNet command --r-bn 0.01

# val_static.py (INFER) on CIFAR: 400 epochs, batch 64, AdamW 1e-3 / wd 0.01, cosine, MixUp 0.8 of the stored labels
# (interpolated in logit space), T 30.  val_dyn.py (INFER+Dyn): the same with the batch relabelled online, 80 epochs
# (INFER_DYN_EVAL; eval.teacher_labels=online eval.epochs=80).
INFER_EVAL = dataclasses.replace(SOFT_LABEL_EVAL, epochs=400, batch_size=64, temperature=30.0, crop_scale=(1.0, 1.0),
                                 mix="mixup", teacher_labels="static")
INFER_DYN_EVAL = dataclasses.replace(INFER_EVAL, epochs=80, teacher_labels="online")


def ufc_groups(ipc: int, num_classes: int, observers: int) -> int:
    """K, the real images per class (= groups) a budget of `ipc` images per class affords when each group also
    stores one compensator per observer: K C + K M <= ipc C, K = floor(ipc C / (C + M))."""
    return ipc * num_classes // (num_classes + observers)


def grouped_bn_statistics_loss(features: torch.Tensor, groups: int, running_mean: torch.Tensor,
                               running_var: torch.Tensor) -> torch.Tensor:
    """SRe2L's BN matching (`decoupled.bn_statistics_loss`) for each of `groups` consecutive equal slices of the
    batch `features` (N, channels, ...): (groups,) of ||mu_g - mu_run||_2 + ||var_g - var_run||_2 with the
    per-channel mean and biased variance of slice g, as if each slice went through the network on its own."""
    x = features.unflatten(0, (groups, -1))
    dims = [1, *range(3, x.dim())]
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    return torch.linalg.vector_norm(running_var - var, dim=-1) + torch.linalg.vector_norm(running_mean - mean, dim=-1)


def compensator_loss(logits: torch.Tensor, targets: torch.Tensor, groups: int, layer_losses: Sequence[torch.Tensor],
                     r_bn: float, first_bn_multiplier: float) -> torch.Tensor:
    """(groups,) losses of the compensators, one per group of consecutive rows of `logits`:
    mean_{i in g} CE(logits_i, targets_i) + r_bn (first_bn_multiplier R_1[g] + sum_{l > 1} R_l[g]), with
    `layer_losses` the (groups,) BN terms R_l of the layers in forward order (ufc_cifar.py `get_images`)."""
    cross_entropy = F.cross_entropy(logits, targets, reduction="none").view(groups, -1).mean(1)
    statistics = first_bn_multiplier * layer_losses[0] + sum(layer_losses[1:], torch.zeros_like(layer_losses[0]))
    return cross_entropy + r_bn * statistics


def roll_groups(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Group g of `images` (groups, n, channels, H, W) cyclically shifted by `shifts[g]` = (rows, columns): the
    reference's ``torch.roll(inputs, shifts=(off1, off2), dims=(2, 3))`` jitter, one draw per compensator."""
    return torch.stack([torch.roll(group, shifts=(int(rows), int(columns)), dims=(-2, -1))
                        for group, (rows, columns) in zip(images, shifts.tolist())])


def ensemble_soft_labels(member_logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """softmax(mean_m logits_m / T): the authors' teacher, the observers' logits averaged (val_static.py)."""
    return torch.softmax(torch.stack(list(member_logits)).float().mean(0) / temperature, -1)


class GroupedBatchNormStatistics(BatchNormStatistics):
    """`BatchNormStatistics` whose per-layer losses are (groups,) vectors, one per consecutive slice of the batch
    (`grouped_bn_statistics_loss`): several compensators' batches share one forward of an eval-mode observer (its
    outputs are per-image) and still get their own BN statistics; `loss(first)` is then (groups,)."""

    def __init__(self, model: nn.Module, groups: int):
        super().__init__(model)
        self.groups = groups

    def _record(self, module: nn.Module, inputs, output) -> None:
        self.losses.append(grouped_bn_statistics_loss(inputs[0], self.groups, module.running_mean,
                                                      module.running_var))


class LogitEnsemble(nn.Module):
    """The observers as one teacher: the mean of their logits (the authors' static and dynamic labelling)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


def ensemble_from_meta(meta: dict[str, Any], device: torch.device) -> LogitEnsemble:
    """The observers a saved INFER set records under meta["observer"]["ensemble"], loaded from their files (or
    their library's weights), as the evaluation's teacher."""
    recorded = (meta.get("observer") or {}).get("ensemble")
    if not recorded:
        raise ConfigError("this set records no observer ensemble (meta['observer']['ensemble']); it was not made "
                          "by infer with several observers")
    members = []
    for index, member in enumerate(recorded):
        source = member.get("source")
        if source != "pretrained":
            source = member.get("file")
            if not source or not Path(source).is_file():
                raise ConfigError(f"the set's observer {index} file {source!r} is missing; keep the observers "
                                  "beside the set or evaluate in the run that made it")
        spec = ObserverSpec(source, member["model"], member.get("options"), member["num_classes"],
                            member["in_channels"], tuple(member["image_size"]))
        members.append(load_observer(spec, device))
    return frozen(LogitEnsemble(members))


@register_condenser("infer", paper=INFER_PAPER,
                    scope="universal feature compensators over groups of real images with an observer ensemble, as zhangxin-xd/UFC; evaluated with INFER's static labels mixed in logit space (val_static.py; INFER+Dyn's online relabelling: eval.teacher_labels=online eval.epochs=80); observers are zoo stand-ins for the authors' ResNet-18/MobileNetV2/EfficientNet/ShuffleNet")
@dataclass(eq=False)
class INFER(ObserverCondenser):
    """Universal feature compensators added to real images (see the module docstring).  `ipc` is the storage
    budget: K = floor(ipc C / (C + M)) real images per class plus K M compensators.

    Options:
        iterations: Adam steps of every compensator (--iteration)
        lr_img: Adam learning rate of the compensators (--lr), cosine-decayed over the iterations
        betas: Adam's betas (get_images: (0.5, 0.9))
        r_bn: weight of the BatchNorm-statistics loss (--r-bn); None: 1, or 0.01 for 1000 classes
        first_bn_multiplier: extra weight of the first BatchNorm layer (--first-bn-multiplier)
        jitter: largest random roll in pixels of each compensator's batch (--jitter)
        observer_model: the M observer architectures, comma-separated (the reference's M = 4 networks)
        observer_options: one dict for every observer, or a list with one per observer (None: BatchNorm ConvNets)
        observer: squeeze, pretrained, or M comma-separated weight files / run folders
    """

    iterations: NonNegativeInt = 1000
    lr_img: Positive = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    momentum_img: UnitInterval = 0.0  # unused: Adam with `betas` updates the compensators (non-zero is refused)
    batch_real: Optional[int] = None  # unused: no real batches are drawn (refused)
    r_bn: Optional[NonNegative] = None  # None: 1 (CIFAR command), 0.01 for 1000 classes (ImageNet command)
    first_bn_multiplier: Positive = 10.0
    jitter: NonNegativeInt = 4
    observer_model: str = DEFAULT_OBSERVERS
    observer_options: Optional[Union[dict, list[Optional[dict]]]] = None

    EVAL: ClassVar[EvalProtocol] = INFER_EVAL

    # -- options ----------------------------------------------------------------------------------------------
    def resolve_options(self) -> None:
        name = self.registry_name
        refused = {"batch_real": self.batch_real is not None, "momentum_img": self.momentum_img != 0,
                   "fyi": self.fyi, "committee_labels": self.committee_labels}
        reasons = {"batch_real": "no real batches are drawn", "momentum_img": "Adam with `betas` updates the UFCs",
                   "fyi": "the compensators are not matched against real batches",
                   "committee_labels": "INFER labels its set with its own observers"}
        for option, given in refused.items():
            if given:
                raise ConfigError(f"{name}: {option} is not used ({reasons[option]}); remove it")
        if self.init != "real":
            raise ConfigError(f"{name}: init must be 'real' (the compensators are added to real images), "
                              f"got {self.init!r}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"{name}: betas must lie in [0, 1), got {tuple(self.betas)}")
        self.architectures = [a.strip() for a in self.observer_model.split(",")]
        if not all(self.architectures):
            raise ConfigError(f"{name}: observer_model must be comma-separated model names, "
                              f"got {self.observer_model!r}")
        count = len(self.architectures)
        if isinstance(self.observer_options, list) and len(self.observer_options) != count:
            raise ConfigError(f"{name}: observer_options lists {len(self.observer_options)} entries for {count} "
                              "observers; give one dict per observer or a single dict for all")
        if self.observer not in SOURCES and len(self.observer.split(",")) != count:
            raise ConfigError(f"{name}: observer names {len(self.observer.split(','))} file(s) for {count} "
                              "observers; give one per observer_model entry (comma-separated)")
        classes = self.data.num_classes
        if self.r_bn is None:
            self.r_bn = R_BN_IMAGENET if classes == IMAGENET_CLASSES else R_BN_CIFAR
        self.groups = ufc_groups(self.ipc, classes, count)
        if self.groups < 1:
            needed = math.ceil((classes + count) / classes)
            raise ConfigError(f"{name}: ipc={self.ipc} affords no real image per class with {count} compensators "
                              f"per group on {classes} classes (K = floor(ipc C / (C + M)) = 0); use ipc >= {needed}")

    @property
    def num_observers(self) -> int:
        return len(self.architectures)

    # -- the learnable compensators and the real groups ----------------------------------------------------------
    def initial_images(self) -> torch.Tensor:
        """Draws the K real groups (`real_groups`, (K, C, channels, H, W)) and returns the M K zero compensators,
        observer-major (row m K + k is u_{k,m}): what `self.images` holds and Adam updates."""
        if self.real.smallest_class < self.groups:
            raise ConfigError(f"{self.registry_name}: ipc={self.ipc} needs {self.groups} real images per class, the "
                              f"smallest class has {self.real.smallest_class}")
        chosen, _ = self.real.per_class(self.groups)  # class-major: class c's K images together
        self.real_groups = chosen.view(self.num_classes, self.groups, *chosen.shape[1:]).transpose(0, 1).contiguous()
        return torch.zeros(self.num_observers * self.groups, self.channels, *self.image_size, device=self.torch_device)

    def setup(self) -> None:
        per_class = self.groups * (self.num_observers + 1)
        self.labels = torch.arange(self.num_classes, device=self.torch_device).repeat_interleave(per_class)
        self.image_optimizer = torch.optim.Adam([self.images], lr=self.lr_img, betas=tuple(self.betas), eps=1e-8)

    def compensated_inputs(self) -> torch.Tensor:
        """(M, K, C, channels, H, W): every real group plus each of its compensators, unclamped."""
        ufcs = self.images.view(self.num_observers, self.groups, 1, *self.images.shape[1:])
        return self.real_groups.unsqueeze(0) + ufcs

    def final_images(self) -> torch.Tensor:
        """The training set, class-major: per class its K real images, then x + u_{k,m} for m = 1..M (k = 1..K
        within each), clamped to valid pixels (the reference's stored images)."""
        stacked = torch.cat([self.real_groups.unsqueeze(0), self.compensated_inputs()])  # (M + 1, K, C, ...)
        images = stacked.permute(2, 0, 1, *range(3, stacked.dim())).flatten(0, 2).detach().clone()
        clamp_to_pixels(self, images)
        return images

    # -- the observers -----------------------------------------------------------------------------------------
    def member_options(self, index: int) -> Optional[dict]:
        options = self.observer_options
        if isinstance(options, list):
            options = options[index]
        if options is None and self.architectures[index].startswith("convnet:"):
            options = {"norm": "batchnorm"}  # BN statistics are matched
        return options

    def member_sources(self) -> list[str]:
        if self.observer in SOURCES:
            return [self.observer] * self.num_observers
        return [source.strip() for source in self.observer.split(",")]

    def member_spec(self, index: int) -> ObserverSpec:
        return ObserverSpec(self.member_sources()[index], self.architectures[index], self.member_options(index),
                            self.num_classes, self.channels, self.image_size)

    def observer_spec(self) -> ObserverSpec:
        """The first observer (for the base class's generic use); `member_spec(i)` gives every one."""
        return self.member_spec(0)

    def member_file(self, index: int) -> Optional[Path]:
        """Where a squeezed member is kept: `observer_file` itself for one observer, else NAME-member<i>.EXT
        beside it (CV-DD's naming)."""
        if not self.observer_file:
            return None
        path = Path(self.observer_file)
        if self.num_observers == 1:
            return path
        return path.with_name(f"{path.stem}-member{index}{path.suffix or '.safetensors'}")

    def member_meta(self, index: int) -> dict[str, Any]:
        """What squeezed member `index` depends on: a saved one is reused only when all of it matches."""
        return jsonable({**self.observer_meta(), **self.member_spec(index).meta(), "seed": self.seed + index})

    def build_member(self, index: int) -> nn.Module:
        spec = self.member_spec(index)
        if spec.source not in SOURCES or spec.source == "pretrained":
            return load_observer(spec, self.torch_device)
        meta, path = self.member_meta(index), self.member_file(index)
        if path is not None:
            saved = read_saved_observer(path, spec, meta, self.torch_device)
            if saved is not None:
                return saved
        if self.observer_epochs < 1:
            raise ConfigError(f"{self.registry_name}: observer=squeeze needs observer_epochs >= 1")
        network = squeeze(self, spec, self.squeeze_settings(), self.progress, seed=self.seed + index)
        if path is not None:
            save_observer(path, network, meta)
        return network

    @cached_property
    def observer_networks(self) -> list[nn.Module]:
        """The M frozen observers, built on first use without touching the global random stream (building a
        model to load weights into draws its initialisation), so a resumed run draws its jitter as an
        uninterrupted one whether the observers were squeezed, reloaded or loaded before or after the resume."""
        devices = [self.torch_device] if self.torch_device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return [self.build_member(index) for index in range(self.num_observers)]

    @cached_property
    def observer_network(self) -> nn.Module:
        """The teacher: the single observer, or the mean of the observers' logits."""
        members = self.observer_networks
        return members[0] if len(members) == 1 else frozen(LogitEnsemble(members))

    def observer_description(self) -> dict[str, Any]:
        members = []
        for index, source in enumerate(self.member_sources()):
            member = {**self.member_spec(index).meta(), "source": source}
            path = self.member_file(index) if source == "squeeze" else (None if source in SOURCES else Path(source))
            if path is not None and path.exists():
                member["file"] = str(path.resolve())
            members.append(member)
        if len(members) == 1:
            return jsonable(members[0])
        # No top-level "file": reloading one member in place of the ensemble would be a different teacher.
        return jsonable({"ensemble": members, "combine": "mean logits", "source": self.observer})

    # -- the optimisation --------------------------------------------------------------------------------------
    def compensator_losses(self) -> torch.Tensor:
        """(M, K): the loss of every compensator u_{k,m} on its group through its observer, each group jittered
        by its own random roll; one forward per observer covers its K groups."""
        groups = self.groups
        targets = torch.arange(self.num_classes, device=self.torch_device).repeat(groups)
        losses = []
        for inputs, observer in zip(self.compensated_inputs(), self.observer_networks):
            shifts = torch.randint(0, self.jitter + 1, (groups, 2))
            jittered = roll_groups(inputs, shifts).flatten(0, 1)
            with GroupedBatchNormStatistics(observer, groups) as statistics:
                logits = observer(jittered)
            losses.append(compensator_loss(logits, targets, groups, statistics.losses, self.r_bn,
                                           self.first_bn_multiplier))
        return torch.stack(losses)

    def matching_loss(self) -> torch.Tensor:
        """The compensators' losses summed: each UFC only enters its own term, so its gradient is that of its
        own loss and one Adam over all of them (element-wise) is the reference's one Adam per UFC."""
        return self.compensator_losses().sum()

    def step(self) -> float:
        cosine_lr(self.image_optimizer, self.lr_img, len(self.history), self.iterations)
        return super().step()

    # -- the set -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def static_labels(self, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """The authors' static soft labels: the observers' mean logits on the un-augmented images, at the
        evaluation temperature (val_static.py)."""
        temperature = self.EVAL.temperature
        parts = [ensemble_soft_labels([member(part) for member in self.observer_networks], temperature)
                 for part in images.split(chunk)]
        return torch.cat(parts)

    def budget(self) -> dict[str, int]:
        """The accounting of `ipc` (module docstring): stored real images + compensators <= ipc x classes."""
        groups, observers, classes = self.groups, self.num_observers, self.num_classes
        return {"ipc": self.ipc, "real_per_class": groups, "compensators": groups * observers,
                "stored_images": groups * classes + groups * observers, "budget_images": self.ipc * classes,
                "images_per_class": groups * (observers + 1)}

    def result(self) -> SyntheticSet:
        _ = self.observer_networks  # built (and saved) before their files are described, even after 0 iterations
        synthetic = super().result()
        synthetic.labels = self.static_labels(self.final_images()).cpu()
        synthetic.meta["budget"] = self.budget()
        synthetic.meta["labels"] = {"kind": "static", "temperature": self.EVAL.temperature,
                                    "teacher": "mean logits of the observers on the final images"}
        return synthetic


register_teacher_loader("ensemble", ensemble_from_meta)


__all__ = ["INFER", "INFER_EVAL", "INFER_DYN_EVAL", "ufc_groups", "grouped_bn_statistics_loss", "compensator_loss", "roll_groups",
           "ensemble_soft_labels", "GroupedBatchNormStatistics", "LogitEnsemble", "ensemble_from_meta"]
