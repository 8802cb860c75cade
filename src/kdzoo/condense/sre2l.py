"""SRe2L: squeeze, recover and relabel (Yin, Xing & Shen, NeurIPS 2023).

What the paper does: (1) squeeze: train an observer on the real data; (2) recover: optimise images from
Gaussian noise so that the frozen observer classifies them as their class while the BatchNorm statistics of
the images match the observer's running statistics; (3) relabel: train fresh networks on random crops of the
recovered images, each crop labelled online by the observer (soft labels at a temperature).

Reference code read: github.com/VILA-Lab/SRe2L, ``SRe2L/recover/data_synthesis.py`` + ``recover/utils.py``
(ImageNet-1K, ``recover/recover.sh``), ``SRe2L/*small_dataset/recover_cifar.py`` + ``recover_cifar.sh``
(CIFAR-100), ``recover_tiny.py`` + ``recover_tiny.sh`` (Tiny-ImageNet), ``relabel_cifar.py`` +
``relabel_cifar.sh`` (the CIFAR evaluation) and ``validate/train_FKD.sh`` (the ImageNet evaluation).

The recover stage as the reference runs it, and as `step()` runs it here:
  * the images are recovered in BATCHES: for IPC index i = 0..ipc-1 and for every group of `class_batch`
    consecutive classes (their ``--batch-size``, 100), one batch holds image i of each class of the group;
    batch b is IPC index b // groups, group b % groups;
  * each batch gets a fresh Adam (betas (0.5, 0.9), eps 1e-8) at `lr_img`, with their `lr_cosine_policy`
    (no warm-up) over `batch_iterations` steps (their ``--iteration``), then the next batch starts;
  * one step: a random view of the batch (below), loss = CE(observer(view), y) + r_bn * (first_bn_multiplier *
    BN loss of the first BatchNorm layer + the BN losses of the other layers), the BN loss of a layer being
    ||mu_batch - mu_running||_2 + ||var_batch - var_running||_2 (`decoupled.bn_statistics_loss`); then the
    images are clipped to the valid pixel range (their ``clip``);
  * the view: ImageNet and Tiny-ImageNet apply ``RandomResizedCrop(size)`` (scale (0.08, 1), ratio (3/4, 4/3))
    and ``RandomHorizontalFlip`` to the whole 4-D batch tensor, so ONE crop box and ONE flip decision per step
    for all images of the batch (torchvision draws its parameters once per call), then ``torch.roll`` by a
    random (dy, dx): in [0, jitter] (ImageNet, CIFAR) or [-jitter, jitter] (Tiny-ImageNet).  CIFAR drops the
    crop and the flip ("we discard the Multi-crop Optimization ... due to the small resolution", README_CIFAR)
    and only rolls.  Here the crop is `relabel.resized_crops` (bilinear, align_corners=False: what torchvision's
    tensor resize does when upsampling), differentiable w.r.t. the images.

`iterations` (the run's outer iterations, what progress bars, checkpoints and ``--resume`` count) is the number
of Adam steps over the whole schedule: ipc x ceil(classes / class_batch) x batch_iterations.  None (default)
runs all of it.  A smaller value stops early: the batches not reached keep their initial noise (a warning says
so); `batch_iterations` is the reference's per-batch ``--iteration``.

Defaults by dataset (`SRE2L_SETTINGS`; other datasets take the row of the nearest image size: 32 px CIFAR-100,
64 px Tiny-ImageNet, 224 px ImageNet-1K):
  ImageNet-1K     4000 it/batch, lr 0.25, r_bn 0.01, first x10, 100 classes/batch, crop+flip, roll [0, 32]
                  (recover/recover.sh; the parser's default --iteration is 1000, the paper reports 1K and 4K)
  Tiny-ImageNet   4000 it/batch, lr 0.1,  r_bn 1.0,  first x10, 100 classes/batch, crop+flip, roll [-4, 4]
                  (recover_tiny.sh / recover_tiny.py)
  CIFAR-100       1000 it/batch, lr 0.25, r_bn 0.01, first x10, 100 classes/batch, no crop/flip, roll [0, 4]
                  (recover_cifar.sh / recover_cifar.py)
  CIFAR-10        CIFAR-100's row (the repository has no CIFAR-10 script)

Evaluation (`EVAL`): relabel_cifar.py/.sh, the CIFAR protocol: 400 epochs, batch 128, AdamW lr 1e-3 weight
decay 0.01, cosine over the epochs, MixUp (alpha 0.8) per batch, soft labels of the observer on the mixed
batch at T = 30 (KL, no T^2).  ImageNet's validate/train_FKD.sh differs (CutMix, T = 20, batch 1024).

What is OUR reading / not implemented:
  * the squeeze: our CPU-sized observer (ConvNet-3 with BatchNorm, `observer_epochs`, see `decoupled.squeeze`);
    SRe2L squeezes a modified ResNet-18 for 200 epochs (CIFAR-100);
  * the images are all drawn from noise at the start (the reference draws each batch's noise when it starts;
    same distribution, another random stream), in the input space of the set (`normalize`);
  * relabel_cifar.py crops with ``RandomCrop(32, padding=4)``; `EvalProtocol` only has random resized crops,
    so the evaluation keeps SRe2L's (0.08, 1) scale.  relabel_cifar.py also never calls ``model_teacher.eval()``
    (its teacher labels with batch statistics); our evaluation labels with the observer in eval mode, as the
    ImageNet relabel (relabel/generate_soft_label.py) does; its weight decay covers every parameter, ours the
    conv/linear weights only (`protocol_settings`);
  * `momentum_img` (the other methods' SGD) is unused: the images are recovered with Adam;
  * the reference keeps no "best" images (it saves the last ones), nor do we; the l2 / total-variation priors of
    data_synthesis.py are 0 in every script and are left out.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import descend
from ..errors import ConfigError
from ..registry import NonNegative, NonNegativeInt, Positive, PositiveInt, register_condenser
from .base import EvalProtocol, SyntheticSet
from .decoupled import SOFT_LABEL_EVAL, BatchNormStatistics, ObserverCondenser, clamp_to_pixels, cosine_lr
from .relabel import OnlineCrops, random_resized_crop_boxes, resized_crops

SRE2L_PAPER = "Yin, Xing & Shen 2023, Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale (NeurIPS)"

# Adam of every recover script: optim.Adam([inputs], lr, betas=[0.5, 0.9], eps=1e-8).
ADAM_BETAS = (0.5, 0.9)
ADAM_EPS = 1e-8
# torchvision's RandomResizedCrop(size) defaults, which the recover scripts use.
RECOVER_CROP = OnlineCrops(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), mix="none")


@dataclass(frozen=True)
class RecoverSettings:
    """One dataset's recover hyper-parameters (the reference's command-line values)."""

    batch_iterations: int  # --iteration
    lr: float  # --lr
    r_bn: float  # --r-bn
    first_bn_multiplier: float  # --first-bn-multiplier
    class_batch: int  # --batch-size: classes recovered together (one image of each)
    random_crop: bool  # RandomResizedCrop + RandomHorizontalFlip before the roll
    jitter: int  # --jitter: largest roll in pixels
    jitter_signed: bool  # rolls drawn from [-jitter, jitter] instead of [0, jitter]


SRE2L_SETTINGS = {
    "imagenet1k": RecoverSettings(4000, 0.25, 0.01, 10.0, 100, True, 32, False),
    "tinyimagenet": RecoverSettings(4000, 0.1, 1.0, 10.0, 100, True, 4, True),
    "cifar100": RecoverSettings(1000, 0.25, 0.01, 10.0, 100, False, 4, False),
    "cifar10": RecoverSettings(1000, 0.25, 0.01, 10.0, 100, False, 4, False),
}
# The row a dataset without its own takes: the nearest of these image sizes.
ROW_BY_IMAGE_SIZE = {32: "cifar100", 64: "tinyimagenet", 224: "imagenet1k"}

# relabel_cifar.sh / relabel_cifar.py: 400 epochs, batch 128, AdamW 1e-3 / 0.01, cosine, MixUp, T = 30.
SRE2L_EVAL = dataclasses.replace(SOFT_LABEL_EVAL, epochs=400, batch_size=128, lr=1e-3, temperature=30.0,
                                 mix="mixup", schedule="cosine")


def table_row(table: dict[str, Any], dataset: str, image_size: tuple[int, int]) -> Any:
    """The dataset's row of a per-dataset table, else the row of the nearest image size (`ROW_BY_IMAGE_SIZE`)."""
    if dataset in table:
        return table[dataset]
    side = max(image_size)
    return table[ROW_BY_IMAGE_SIZE[min(ROW_BY_IMAGE_SIZE, key=lambda s: (abs(s - side), s))]]


# --- the math --------------------------------------------------------------------------------------------------


def committee_recover_loss(ce_losses: torch.Tensor, bn_losses: torch.Tensor, weights: torch.Tensor,
                           r_bn: float) -> torch.Tensor:
    """sum_i w_i (CE_i + r_bn * BN_i) over the recovering networks i (CV-DD's recover.py); SRe2L is the case of
    one network with weight 1: CE + r_bn * BN, BN = first_bn_multiplier * L_1 + sum_{l > 1} L_l."""
    return (weights.to(ce_losses) * (ce_losses + r_bn * bn_losses)).sum()


@dataclass(frozen=True)
class RecoverView:
    """One step's augmentation of a recover batch: a crop box (top, left, height, width) or None, a horizontal
    flip, and the roll (dy, dx), each shared by every image of the batch."""

    box: Optional[tuple[int, int, int, int]]
    flip: bool
    shifts: tuple[int, int]


def draw_recover_view(image_size: tuple[int, int], random_crop: bool, jitter: int, jitter_signed: bool
                      ) -> RecoverView:
    """A random `RecoverView` from torch's global generator, as torchvision draws RandomResizedCrop and
    RandomHorizontalFlip once for a whole batch tensor, then the reference's random.randint roll offsets."""
    box, flip = None, False
    if random_crop:
        box = tuple(int(v) for v in random_resized_crop_boxes(1, *image_size, RECOVER_CROP, None)[0])
        flip = bool(torch.rand(1) < 0.5)
    low = -jitter if jitter_signed else 0
    dy, dx = (int(v) for v in torch.randint(low, jitter + 1, (2,)))
    return RecoverView(box, flip, (dy, dx))


def apply_recover_view(images: torch.Tensor, view: RecoverView) -> torch.Tensor:
    """Crop every image to `view.box` and resize it back (bilinear), flip, roll: differentiable in `images`."""
    out = images
    if view.box is not None:
        boxes = torch.tensor([view.box], dtype=torch.long).expand(len(images), 4)
        out = resized_crops(out, boxes, tuple(images.shape[-2:]))
    if view.flip:
        out = out.flip(-1)
    return torch.roll(out, shifts=view.shifts, dims=(2, 3))


def recover_terms(network: nn.Module, view: torch.Tensor, targets: torch.Tensor, first_bn_multiplier: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE of the network's logits, its weighted BatchNorm-statistics loss) on one augmented batch."""
    with BatchNormStatistics(network) as statistics:
        logits = network(view)
    return F.cross_entropy(logits, targets), statistics.loss(first_bn_multiplier)


# --- the condenser ---------------------------------------------------------------------------------------------


@register_condenser("sre2l", paper=SRE2L_PAPER,
                    scope="the whole method (squeeze, BN-statistics recover with the authors' per-dataset schedule, relabel); ours: the squeeze model is a CPU-sized ConvNet-3 with BatchNorm unless observer= names one, relabelling is online per crop (the stored per-crop file is kdzoo.condense.relabel), the CIFAR evaluation uses resized crops in place of RandomCrop(32, 4)")
@dataclass(eq=False)
class SRe2L(ObserverCondenser):
    """SRe2L's recover stage on the observer, batch by batch (see the module docstring).  Options left None
    take the authors' value for the dataset (`SRE2L_SETTINGS`).

    Options:
        iterations: Adam steps of the whole schedule to run (ipc x class batches x batch_iterations); None: all
        batch_iterations: Adam steps per batch (the reference's --iteration)
        lr_img: Adam learning rate of the images (--lr), cosine-decayed within each batch
        r_bn: weight of the BatchNorm-statistics loss (--r-bn)
        first_bn_multiplier: extra weight of the first BatchNorm layer (--first-bn-multiplier)
        class_batch: classes recovered together, one image of each (--batch-size)
        random_crop: RandomResizedCrop + flip of the batch before the roll (off on CIFAR)
        jitter: largest random roll in pixels (--jitter)
        jitter_signed: rolls from [-jitter, jitter] (Tiny-ImageNet) instead of [0, jitter]
    """

    iterations: Optional[NonNegativeInt] = None
    init: str = "noise"
    lr_img: Optional[Positive] = None
    batch_real: Optional[PositiveInt] = None  # unused: no real batches are drawn (refused)
    batch_iterations: Optional[PositiveInt] = None
    r_bn: Optional[NonNegative] = None
    first_bn_multiplier: Optional[NonNegative] = None
    class_batch: Optional[PositiveInt] = None
    random_crop: Optional[bool] = None
    jitter: Optional[NonNegativeInt] = None
    jitter_signed: Optional[bool] = None

    EVAL: ClassVar[EvalProtocol] = SRE2L_EVAL
    SETTINGS: ClassVar[dict[str, RecoverSettings]] = SRE2L_SETTINGS

    def __post_init__(self) -> None:
        self.resolve_options()  # before the base checks `iterations`, which None would fail
        super().__post_init__()

    # -- options ----------------------------------------------------------------------------------------------
    def resolve_options(self) -> None:
        name = self.registry_name
        if self.batch_real is not None:
            raise ConfigError(f"{name}: batch_real is not used (the recover stage draws no real batches); remove it")
        if self.fyi:
            raise ConfigError(f"{name}: fyi is not supported (the recover loss matches no real images)")
        row = table_row(self.SETTINGS, self.data.name, tuple(self.data.image_size))
        for option, value in (("batch_iterations", row.batch_iterations), ("lr_img", row.lr), ("r_bn", row.r_bn),
                              ("first_bn_multiplier", row.first_bn_multiplier), ("class_batch", row.class_batch),
                              ("random_crop", row.random_crop), ("jitter", row.jitter),
                              ("jitter_signed", row.jitter_signed)):
            if getattr(self, option) is None:
                setattr(self, option, value)
        schedule = self.schedule_length()
        if self.iterations is None:
            self.iterations = schedule
        elif self.iterations > schedule:
            raise ConfigError(f"{name}: iterations={self.iterations} is more than the whole recover schedule "
                              f"({self.ipc} x {self.class_groups()} batches x batch_iterations="
                              f"{self.batch_iterations} = {schedule}); leave iterations unset to run all of it")

    def class_groups(self) -> int:
        return math.ceil(self.data.num_classes / self.class_batch)

    def num_batches(self) -> int:
        return self.ipc * self.class_groups()

    def schedule_length(self) -> int:
        return self.num_batches() * self.batch_iterations

    def setup(self) -> None:
        schedule = self.schedule_length()
        if self.iterations < schedule:
            done = self.iterations // self.batch_iterations
            warnings.warn(f"{self.registry_name}: iterations={self.iterations} stops before the end of the recover "
                          f"schedule ({schedule} = {self.num_batches()} batches x {self.batch_iterations}); batches "
                          f"{done + 1}..{self.num_batches()} keep (part of) their initial images", stacklevel=2)
        self.batch_images: Optional[torch.Tensor] = None  # the leaf Adam optimises: the active batch's images
        self.batch_optimizer: Optional[torch.optim.Optimizer] = None
        self.active_batch: Optional[int] = None

    # -- the batches ------------------------------------------------------------------------------------------
    def batch_rows(self, batch: int) -> tuple[torch.Tensor, int]:
        """Rows of `self.images` (class-major) in recover batch `batch`, and its IPC index."""
        ipc_index, group = divmod(batch, self.class_groups())
        classes = torch.arange(group * self.class_batch, min((group + 1) * self.class_batch, self.num_classes),
                               device=self.torch_device)
        return classes * self.ipc + ipc_index, ipc_index

    def start_batch(self, batch: int) -> None:
        """A fresh Adam over a copy of the batch's images (the reference's new `inputs` and optimizer)."""
        rows, _ = self.batch_rows(batch)
        self.batch_images = self.images.detach()[rows].clone().requires_grad_(True)
        self.batch_optimizer = torch.optim.Adam([self.batch_images], lr=self.lr_img, betas=ADAM_BETAS, eps=ADAM_EPS)
        self.active_batch = batch

    @cached_property
    def observer_network(self) -> nn.Module:
        """The base's observer (squeezed, or read from `observer_file`), built outside the run's random stream:
        loading a saved observer draws a network initialisation a fresh squeeze does not, and a resumed run
        must continue the same stream."""
        devices = [self.torch_device] if self.torch_device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return ObserverCondenser.observer_network.func(self)

    def recovering_networks(self, ipc_index: int) -> tuple[list[nn.Module], torch.Tensor]:
        """The networks the images of IPC index `ipc_index` are recovered against, and their loss weights."""
        return [self.observer_network], torch.ones(1)

    def batch_loss(self, images: torch.Tensor, targets: torch.Tensor, ipc_index: int) -> torch.Tensor:
        """The recover loss of one random view of a batch (`committee_recover_loss` over the recovering networks)."""
        view = apply_recover_view(images, draw_recover_view(self.image_size, self.random_crop, self.jitter,
                                                             self.jitter_signed))
        networks, weights = self.recovering_networks(ipc_index)
        terms = [recover_terms(network, view, targets, self.first_bn_multiplier) for network in networks]
        ce_losses, bn_losses = (torch.stack(column) for column in zip(*terms))
        return committee_recover_loss(ce_losses, bn_losses, weights, self.r_bn)

    def matching_loss(self) -> torch.Tensor:
        """The recover loss of the batch being recovered now (the last one once all are done), one random view."""
        batch = min(len(self.history) // self.batch_iterations, self.num_batches() - 1)
        rows, ipc_index = self.batch_rows(batch)
        return self.batch_loss(self.images[rows], self.labels[rows], ipc_index)

    def step(self) -> float:
        batch, within = divmod(len(self.history), self.batch_iterations)
        if batch != self.active_batch:
            self.start_batch(batch)
        cosine_lr(self.batch_optimizer, self.lr_img, within, self.batch_iterations)
        rows, ipc_index = self.batch_rows(batch)
        loss = self.batch_loss(self.batch_images, self.labels[rows], ipc_index)
        descend([self.batch_optimizer], loss)
        clamp_to_pixels(self, self.batch_images)
        with torch.no_grad():
            self.images[rows] = self.batch_images
        return loss.item()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.batch_optimizer is None else [self.batch_optimizer]

    # -- checkpoints: the images, the history and the active batch's Adam ------------------------------------
    def state_dict(self) -> dict[str, Any]:
        optimizer = None if self.batch_optimizer is None else self.batch_optimizer.state_dict()
        return {"images": self.images.detach().cpu(), "history": list(self.history),
                "active_batch": self.active_batch, "batch_optimizer": optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.torch_device))
        self.history = list(state["history"])
        self.batch_images, self.batch_optimizer, self.active_batch = None, None, None
        batch, within = divmod(len(self.history), self.batch_iterations)
        # Mid-batch: the same Adam continues; at a batch boundary the next step starts a fresh one.
        if within and state["active_batch"] == batch and state["batch_optimizer"] is not None:
            self.start_batch(batch)
            self.batch_optimizer.load_state_dict(state["batch_optimizer"])

    # -- the set ----------------------------------------------------------------------------------------------
    def evaluation_protocol(self) -> EvalProtocol:
        """The authors' evaluation of this dataset and IPC (SRe2L: its CIFAR protocol, `EVAL`)."""
        return self.EVAL

    def result(self) -> SyntheticSet:
        synthetic = super().result()
        synthetic.meta["eval"] = dataclasses.asdict(self.evaluation_protocol())
        return synthetic


__all__ = ["SRe2L", "RecoverSettings", "SRE2L_SETTINGS", "SRE2L_EVAL", "RecoverView", "draw_recover_view",
           "apply_recover_view", "committee_recover_loss", "recover_terms", "table_row"]
