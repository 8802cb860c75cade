"""KRR-ST: kernel ridge regression on self-supervised targets (Lee et al. 2024, "Self-Supervised Dataset
Distillation for Transfer Learning", ICLR).

What the paper does.  An unlabelled dataset is distilled into images X_s AND learnable target representations
Y_s, for pre-training a network by regression (MSE) on (X_s, Y_s) and then transferring it to other tasks.
A self-supervised target model (the authors: a Barlow Twins ResNet-18) gives the representations; Y_s starts as
its representations of the initial images.  Each outer iteration draws a network from a pool of networks being
trained on (X_s, Y_s) by MSE regression, takes its penultimate features of X_s and of an augmented real batch
X_t, fits the linear head from the synthetic features to Y_s by kernel ridge regression in closed form, and
minimises the MSE between that head's prediction on X_t and the target model's representations of X_t, w.r.t.
X_s and Y_s.  The drawn network then takes one more regression step on (X_s, Y_s) (or is reinitialised).

Reference code read: github.com/db-Lee/selfsup_dd -- ``train.py`` (setup, options, per-dataset values in
its README), ``algorithms/distill.py`` (the outer loss and update), ``model_pool.py`` (the pool),
``algorithms/pretrain_krr_st.py`` (pre-training on the set), ``test.py``, ``test_scratch.py``,
``algorithms/finetune.py``, ``algorithms/linear_eval.py`` (transfer evaluation), ``models/convnet.py``.

Followed from the reference:
- the loss (`krr_st_loss`): a bias column of ones appended to both feature matrices, the linear kernel
  K = F Fᵀ, ridge λ = 1e-6 · trace(K_ss) held constant in the gradient, prediction K_ts (K_ss + λI)⁻¹ Y_s
  by ``torch.linalg.solve``, element-mean squared error to the real batch's target representations
  (distill.py lines 29-48); the drawn network in eval mode, its real-batch features without a graph;
- the outer optimiser: one AdamW (weight decay 0) over X_s and Y_s with the same learning rate, decayed
  linearly to 1e-3 of it over the run (train.py lines 66-74, 114), lr 1e-4 for CIFAR-100 and 1e-5 for
  TinyImageNet / ImageNet (README), 160000 iterations, 1024 real images per iteration (train.py 160-162);
- the pool (model_pool.py): 10 networks, each first trained a random number of steps in [1, 1000) on the
  whole (X_s, Y_s), then per draw one full-batch MSE step of SGD (lr 0.1, momentum 0.9, weight decay 1e-3)
  until it has taken 1000 steps, when it is reinitialised;
- the real batch augmented by random crop (4-pixel padding) and horizontal flip before both the target model
  and the drawn network (data/augmentation.py ``get_aug``, train.py line 31);
- the network: ConvNet with BatchNorm, its output as wide as the representation, the KRR features its
  flattened last feature map (``embed``, models/convnet.py); the representation is the target model's
  penultimate feature (the authors' ResNet-18 with ``fc = Identity``, train.py lines 39-43).

Our reading / differences (a name here promises no more than this):
- ``target_model="train"`` (the default when no weights file is given) is OUR STAND-IN for the authors'
  pretrained Barlow Twins ResNet-18 (whose checkpoints are a download): `target_arch` trained in setup on the
  training images with `barlow_twins_loss` for `target_epochs` epochs, two views by chained DSA operations
  (`target_augment`), a two-layer projector and Adam; the authors' target training recipe is not in their
  repository.  A path loads weights into `target_arch` instead.  Either way the representation is the target's
  penultimate feature (the input of its last linear layer).
- model_pool.py never resets a network's step counter after reinitialising it, so once a network has taken
  `online_steps` steps it is reinitialised at every draw and never trained again; we reset the counter
  (a network is reinitialised every `online_steps` steps, as the paper describes the pool).
  ``reset_counter=False`` reproduces the code.
- The authors feed X_s to the networks as raw [0, 1] pixels while the real batch is normalised
  (train.py lines 49-57, distill.py line 30); here X_s lives in the same input space as the real images
  (kdzoo's normalisation or ZCA), saved in pixel space with it.
- kdzoo's ConvNet has one width; the authors' widens 128-256-512.  The default network is ConvNet-3 of width
  128 with BatchNorm (4 blocks from 64-pixel images on, as the authors' 64-128-256-512).
- The initial images are `ipc` random real images per class (class-balanced; the authors take the first
  N images of a shuffled loader).  CIFAR-10 and other datasets take CIFAR-100's lr (the authors distil
  CIFAR-100, TinyImageNet and ImageNet only).  The real batch is a fresh random subset each iteration
  (the authors walk through epochs); crop pads with zeros of the input space (mean colour), not black.
- Not implemented: the authors' optional gradient-norm clipping (``--outer_grad_norm``, off by default) and
  their periodic linear evaluation during distillation.

Transfer (`transfer_accuracy`): fresh networks pre-trained on (X_s, Y_s) by MSE (`pretrain_on_representations`:
SGD lr 0.1, momentum 0.9, weight decay 1e-3, batch 256, 1000 epochs, pretrain_krr_st.py / test.py), then by
default FULLY FINE-TUNED with a new head on the labelled task as test.py / finetune.py do (SGD lr 0.01, momentum
0.9, weight decay 5e-4, cosine, batch 256, crop+flip, 10000 steps on CIFAR/TinyImageNet else 5000), or
``probe="linear"``: a linear probe on frozen penultimate features as linear_eval.py (lr 0.2, batch 512, 5000
steps, no weight decay); beside the same protocol from random initialisation (test_scratch.py).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..engine.runtime import resolve_device
from ..engine.stacked import StackedModels, StackTraining, loss_gradient, train_stack
from ..errors import ConfigError
from ..models.weights import load_weights
from ..registry import NonNegative, Positive, PositiveInt, UnitInterval, register_condenser
from ..taps import discover_layout, split_tap
from .augment import DSA
from .base import Condenser, SyntheticSet, build_network, jsonable
from .space import build_input_space, pixel_tensors

KRRST_PAPER = "Lee et al. 2024, Self-Supervised Dataset Distillation for Transfer Learning (ICLR)"

# The outer (Adam) learning rate by dataset, the authors' README commands; other datasets take CIFAR-100's.
KRRST_OUTER_LR = {"cifar100": 1e-4, "tinyimagenet": 1e-5, "imagenet": 1e-5}
DEFAULT_LR_DATASET = "cifar100"
# Fine-tuning steps by target dataset (test.py lines 75-78).
LONG_FINETUNE_DATASETS = ("cifar10", "cifar100", "tinyimagenet")
PROBES = ("finetune", "linear")


# --- the math -----------------------------------------------------------------------------------

def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, offdiag_weight: float = 0.0051,
                      eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021) of two views' embeddings (B, P): every dimension standardised over the
    batch (mean 0, biased variance + eps: BatchNorm without affine), cross-correlation C = z1ᵀ z2 / B, and
    ``sum_i (1 - C_ii)^2 + offdiag_weight * sum_{i != j} C_ij^2`` (λ = 0.0051 as the official code)."""
    batch = z1.shape[0]
    a = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
    b = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
    c = a.T @ b / batch
    diagonal = torch.diagonal(c)
    return (diagonal - 1).square().sum() + offdiag_weight * (c.square().sum() - diagonal.square().sum())


def with_bias(features: torch.Tensor) -> torch.Tensor:
    """Flattened features with a constant 1 appended (the kernel's bias term)."""
    return F.pad(features.flatten(1), (0, 1), value=1.0)


def krr_predict(syn_features: torch.Tensor, real_features: torch.Tensor, syn_targets: torch.Tensor,
                ridge: float = 1e-6) -> torch.Tensor:
    """Kernel ridge regression from the synthetic features to `syn_targets`, evaluated at the real features:
    ``K_ts (K_ss + λ I)^-1 Y_s`` with the linear kernel of the features plus a constant 1 (a bias column) and
    ``λ = ridge * trace(K_ss)`` held constant in the gradient (distill.py)."""
    phi_s, phi_t = with_bias(syn_features), with_bias(real_features)
    k_ss = phi_s @ phi_s.T
    k_ts = phi_t @ phi_s.T
    lam = ridge * torch.trace(k_ss.detach())
    eye = torch.eye(k_ss.shape[0], dtype=k_ss.dtype, device=k_ss.device)
    return k_ts @ torch.linalg.solve(k_ss + lam * eye, syn_targets)


def krr_st_loss(syn_features: torch.Tensor, real_features: torch.Tensor, syn_targets: torch.Tensor,
                real_targets: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """KRR-ST's outer loss: element-mean squared error between `krr_predict` at the real batch and the target
    model's representations of it."""
    return F.mse_loss(krr_predict(syn_features, real_features, syn_targets, ridge), real_targets)


def linear_decay(done: int, total: int, final_factor: float = 1e-3) -> float:
    """The learning-rate factor of update number `done` (from 0) of `total`: 1 falling linearly to
    `final_factor` at `total` (``torch.optim.lr_scheduler.LinearLR(start_factor=1, end_factor=final_factor,
    total_iters=total)``)."""
    if total <= 0:
        return 1.0
    return 1.0 + (final_factor - 1.0) * min(done, total) / total


# --- small helpers --------------------------------------------------------------------------------

def augment_chain(strategy: str, option: str, owner: str) -> list[DSA]:
    """One DSA per operation of `strategy` ("crop_flip"), applied one after another with per-image parameters."""
    names = [] if strategy in ("", "none") else strategy.split("_")
    try:
        return [DSA(name) for name in names]
    except ConfigError:
        raise ConfigError(f"{owner}: {option} {strategy!r} has an unknown operation; join operations of "
                          "color, crop, cutout, flip, scale, rotate with '_' (or 'none')") from None


def apply_chain(chain: list[DSA], x: torch.Tensor) -> torch.Tensor:
    for dsa in chain:
        x = dsa.augment(x)
    return x


def penultimate(network: nn.Module, tap: str, x: torch.Tensor) -> torch.Tensor:
    """`network`'s feature at `tap` (the input of its last linear layer), flattened; differentiable."""
    return Condenser.features(network, x, [tap])[0].flatten(1)


def representations(network: nn.Module, tap: str, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """`penultimate` in eval mode, without a graph, chunk by chunk (training mode restored)."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            return torch.cat([penultimate(network, tap, part) for part in x.split(chunk)])
    finally:
        network.train(was_training)


@contextmanager
def frozen(network: nn.Module) -> Iterator[nn.Module]:
    """The network's parameters out of autograd for a while: the outer loss reaches X_s and Y_s only."""
    params = [p for p in network.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield network
    finally:
        for p in params:
            p.requires_grad_(True)


def head_module(network: nn.Module, example: torch.Tensor) -> Optional[str]:
    """The path of the module whose input is the penultimate feature (the head a transfer replaces)."""
    path, is_input = split_tap(discover_layout(network, example).penultimate)
    return path if is_input else None


def shuffled_batches(count: int, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless index batches over `count` items, a new order every pass (the last batch of a pass may be short)."""
    while True:
        yield from torch.randperm(count, device=device).split(batch_size)


# --- the self-supervised target -----------------------------------------------------------------

@dataclass(frozen=True)
class BarlowTwinsTraining:
    """How `train_barlow_twins` trains a target (our stand-in recipe; see the module docstring)."""

    epochs: int
    lr: float
    batch_size: int
    projector_dim: int
    offdiag_weight: float


def train_barlow_twins(backbone: nn.Module, tap: str, images: torch.Tensor, settings: BarlowTwinsTraining,
                       views: Callable[[torch.Tensor], torch.Tensor], progress: Optional[str] = None) -> nn.Module:
    """Train `backbone` in place by Barlow Twins on `images`: two `views` of each batch, its feature at `tap`
    through a projector (Linear-BatchNorm-ReLU-Linear, `projector_dim` wide), `barlow_twins_loss`, Adam.
    Incomplete last batches are dropped (at least one batch per epoch).  Returns the projector."""
    device = images.device
    width = representations(backbone, tap, images[:2]).shape[1]
    with torch.device(device):
        projector = nn.Sequential(nn.Linear(width, settings.projector_dim, bias=False),
                                  nn.BatchNorm1d(settings.projector_dim), nn.ReLU(),
                                  nn.Linear(settings.projector_dim, settings.projector_dim, bias=False))
    optimizer = torch.optim.Adam([*backbone.parameters(), *projector.parameters()], lr=settings.lr)
    batch = min(settings.batch_size, len(images))
    backbone.train()
    projector.train()
    for _ in tqdm(range(settings.epochs), desc=progress, disable=progress is None, dynamic_ncols=True):
        order = torch.randperm(len(images), device=device)
        for index in order[:len(images) - len(images) % batch].split(batch):
            x = images[index]
            z1 = projector(penultimate(backbone, tap, views(x)))
            z2 = projector(penultimate(backbone, tap, views(x)))
            loss = barlow_twins_loss(z1, z2, settings.offdiag_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    backbone.eval()
    return projector


# --- the model pool -----------------------------------------------------------------------------

@dataclass(frozen=True)
class OnlineTraining:
    """How the pool's networks train on (X_s, Y_s): full-batch MSE steps of SGD; reinitialised after `steps`."""

    steps: int
    lr: float
    momentum: float
    weight_decay: float
    reset_counter: bool = True  # False: model_pool.py, which never resets it (see the module docstring)


def regression_step(network: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                    targets: torch.Tensor) -> None:
    """One full-batch MSE step of `network`'s output towards `targets` (training mode)."""
    network.train()
    optimizer.zero_grad(set_to_none=True)
    F.mse_loss(network(images), targets).backward()
    optimizer.step()


class ModelPool:
    """Networks being trained on the synthetic set, each with its SGD optimizer and its step count."""

    def __init__(self, build: Callable[[], nn.Module], size: int, training: OnlineTraining):
        self.build, self.training = build, training
        self.networks = [build() for _ in range(size)]
        self.optimizers = [self.optimizer(n) for n in self.networks]
        self.steps = [0] * size

    def __len__(self) -> int:
        return len(self.networks)

    def optimizer(self, network: nn.Module) -> torch.optim.Optimizer:
        t = self.training
        return torch.optim.SGD(network.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def initialise(self, images: torch.Tensor, targets: torch.Tensor, progress: Optional[str] = None) -> None:
        """Each network trained a random number of steps in [1, steps), so the pool spans training stages."""
        for i in tqdm(range(len(self)), desc=progress, disable=progress is None, dynamic_ncols=True):
            self.steps[i] = int(torch.randint(1, self.training.steps, ()))
            for _ in range(self.steps[i]):
                regression_step(self.networks[i], self.optimizers[i], images, targets)

    def update(self, index: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        """After network `index` was drawn: reinitialise it once it has taken `steps` steps, else one more step."""
        if self.steps[index] >= self.training.steps:
            self.networks[index] = self.build()
            self.optimizers[index] = self.optimizer(self.networks[index])
            if self.training.reset_counter:
                self.steps[index] = 0
            return
        self.steps[index] += 1
        regression_step(self.networks[index], self.optimizers[index], images, targets)

    def state_dict(self) -> dict:
        return {"networks": [n.state_dict() for n in self.networks],
                "optimizers": [o.state_dict() for o in self.optimizers], "steps": list(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        for i, (network_state, optimizer_state) in enumerate(zip(state["networks"], state["optimizers"])):
            self.networks[i] = self.build()
            self.networks[i].load_state_dict(network_state)
            self.optimizers[i] = self.optimizer(self.networks[i])
            self.optimizers[i].load_state_dict(optimizer_state)
        self.steps = list(state["steps"])


# --- the condenser ------------------------------------------------------------------------------

@register_condenser("krr_st", paper=KRRST_PAPER,
                    scope="the method as in db-Lee/selfsup_dd (KRR on learned target representations, model pool, transfer evaluation); ours: target_model=train is a Barlow Twins stand-in trained here for the authors' pretrained ResNet-18")
@dataclass(eq=False)
class KRRST(Condenser):
    """KRR-ST.  The saved set's `labels` are the learned target representations Y_s (float, (N, D)) and its meta
    says ``"targets": "representations"``; evaluate it with `transfer_accuracy`, not `evaluate_synthetic`.

    The target model, the pool and Y_s are prepared on first use from their own random stream (`seed`), so
    they do not depend on when that happens (the first iteration, a fixed-draw loss, a resume)."""

    iterations: int = 160000
    lr_img: Optional[Positive] = None  # Adam lr of X_s; None: by dataset (KRRST_OUTER_LR)
    lr_targets: Optional[Positive] = None  # Adam lr of Y_s; None: lr_img (the authors' one optimizer)
    lr_final_factor: UnitInterval = 1e-3  # the lrs fall linearly to this fraction over `iterations`
    momentum_img: UnitInterval = 0.0  # unused: X_s and Y_s take Adam (other values refused)
    batch_real: Optional[int] = None  # unused: see outer_batch (refused)
    dsa_strategy: str = "none"  # unused: see real_augment (refused)
    outer_batch: PositiveInt = 1024  # real images per iteration, from the whole training split
    real_augment: str = "crop_flip"  # operations applied in turn to the real batch (each per image)
    kernel_ridge: Positive = 1e-6  # λ = kernel_ridge * trace(K_ss)
    pool_size: PositiveInt = 10
    online_steps: PositiveInt = 1000  # steps a pool network trains before it is reinitialised
    online_lr: Positive = 0.1
    online_momentum: UnitInterval = 0.9
    online_weight_decay: NonNegative = 1e-3
    reset_counter: bool = True  # False: the reference code's pool (see the module docstring)
    target_model: str = "train"  # "train" (our Barlow Twins stand-in) or a weights file / run directory
    target_arch: str = "cifar:resnet32x4"
    target_options: Optional[dict] = None
    target_epochs: PositiveInt = 100  # this and the options below: target_model="train" only
    target_lr: Positive = 1e-3
    target_batch: PositiveInt = 256
    target_projector: PositiveInt = 2048
    target_augment: str = "crop_scale_flip_color"
    barlow_offdiag: Positive = 0.0051

    # -- options ---------------------------------------------------------------------------------
    def resolve_options(self) -> None:
        name = self.registry_name
        for option, unused, hint in (("batch_real", self.batch_real is not None, "use outer_batch"),
                                     ("momentum_img", self.momentum_img != 0.0, "X_s and Y_s take Adam"),
                                     ("dsa_strategy", self.dsa_strategy != "none", "use real_augment"),
                                     ("fyi", self.fyi, "not part of KRR-ST"),
                                     ("committee_labels", self.committee_labels, "the labels are representations")):
            if unused:
                raise ConfigError(f"{name}: {option} is not used by KRR-ST ({hint}); remove it")
        if self.online_steps < 2:
            raise ConfigError(f"{name}: online_steps must be >= 2 (pool networks start at a random step in "
                              f"[1, online_steps)), got {self.online_steps}")
        if self.target_model != "train" and not Path(self.target_model).exists():
            raise ConfigError(f"{name}: target_model must be 'train' or a weights file / run directory; "
                              f"{self.target_model!r} does not exist")
        if self.lr_img is None:
            self.lr_img = KRRST_OUTER_LR.get(self.data.name, KRRST_OUTER_LR[DEFAULT_LR_DATASET])
        if self.lr_targets is None:
            self.lr_targets = self.lr_img
        if self.model_options is None:
            self.model_options = {"norm": "batchnorm"}
            side = min(self.data.image_size)
            if side >= 64:  # the authors' 64-pixel ConvNet has four blocks
                self.model_options["depth"] = 3 + int(math.log2(side // 32))
        self.real_chain = augment_chain(self.real_augment, "real_augment", name)
        self.target_chain = augment_chain(self.target_augment, "target_augment", name)

    # -- preparation -----------------------------------------------------------------------------
    def setup(self) -> None:
        self.prepared = False

    def prepare(self) -> None:
        """Target model, Y_s, the Adam optimizer and the pool, once, from a stream seeded by `seed`."""
        if self.prepared:
            return
        devices = [self.torch_device] if self.torch_device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            self.target, self.target_tap = self.build_target()
            initial = representations(self.target, self.target_tap, self.images.detach())
            self.targets = initial.clone().requires_grad_(True)
            self.representation_dim = self.targets.shape[1]
            self.outer_optimizer = torch.optim.AdamW(
                [{"params": [self.images], "lr": self.lr_img}, {"params": [self.targets], "lr": self.lr_targets}],
                weight_decay=0.0)
            training = OnlineTraining(self.online_steps, self.online_lr, self.online_momentum,
                                      self.online_weight_decay, self.reset_counter)
            self.pool = ModelPool(self.pool_network, self.pool_size, training)
            self.feature_tap = self.layout(self.pool.networks[0]).penultimate
            self.pool.initialise(self.images.detach(), self.targets.detach(),
                                 "model pool" if self.progress else None)
        self.prepared = True

    def build_target(self) -> tuple[nn.Module, str]:
        """The self-supervised target network (eval mode, frozen) and the tap of its representation."""
        target = build_network(self.target_arch, self.num_classes, self.channels, self.image_size,
                               self.target_options, self.torch_device)
        tap = discover_layout(target, self.real.images[:2]).penultimate
        if self.target_model == "train":
            settings = BarlowTwinsTraining(self.target_epochs, self.target_lr, self.target_batch,
                                           self.target_projector, self.barlow_offdiag)
            train_barlow_twins(target, tap, self.real.images, settings,
                               lambda x: apply_chain(self.target_chain, x),
                               "target (Barlow Twins)" if self.progress else None)
        else:
            self.target_report = load_weights(target, self.target_model, "target_model").summary()
        return target.eval().requires_grad_(False), tap

    def pool_network(self) -> nn.Module:
        """A fresh network whose output is as wide as the representation (it regresses Y_s)."""
        return build_network(self.model, self.representation_dim, self.channels, self.image_size,
                             self.model_options, self.torch_device)

    # -- one iteration ---------------------------------------------------------------------------
    def real_batch(self) -> torch.Tensor:
        count = len(self.real.images)
        index = torch.randperm(count, device=self.torch_device)[:min(self.outer_batch, count)]
        return apply_chain(self.real_chain, self.real.images[index])

    def draw_loss(self, network: nn.Module) -> torch.Tensor:
        """`krr_st_loss` of the current (X_s, Y_s) with `network`'s features (eval mode) on a new real batch."""
        network.eval()
        real = self.real_batch()
        with torch.no_grad():
            real_targets = penultimate(self.target, self.target_tap, real)
            real_features = penultimate(network, self.feature_tap, real)
        with frozen(network):
            syn_features = penultimate(network, self.feature_tap, self.images)
        return krr_st_loss(syn_features, real_features, self.targets, real_targets, self.kernel_ridge)

    def matching_loss(self) -> torch.Tensor:
        self.prepare()
        return self.draw_loss(self.pool.networks[int(torch.randint(len(self.pool), ()))])

    def step(self) -> float:
        self.prepare()
        index = int(torch.randint(len(self.pool), ()))
        loss = self.draw_loss(self.pool.networks[index])
        factor = linear_decay(len(self.history), self.iterations, self.lr_final_factor)
        for group, lr in zip(self.outer_optimizer.param_groups, (self.lr_img, self.lr_targets)):
            group["lr"] = lr * factor
        self.update(loss)
        self.pool.update(index, self.images.detach(), self.targets.detach())
        return loss.item()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        self.prepare()
        return [self.outer_optimizer]

    # -- state and result ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.prepare()
        return {**super().state_dict(), "targets": self.targets.detach().cpu(), "pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prepare()
        super().load_state_dict(state)
        with torch.no_grad():
            self.targets.copy_(state["targets"].to(self.torch_device))
        self.pool.load_state_dict(state["pool"])

    def result(self) -> SyntheticSet:
        """The set with Y_s as its labels (float (N, D)), marked ``"targets": "representations"``."""
        self.prepare()
        synthetic = super().result()
        synthetic.labels = self.targets.detach().cpu().clone()
        synthetic.meta.update({"targets": "representations", "representation_dim": self.representation_dim,
                               "target": self.target_model, "target_arch": self.target_arch,
                               "target_options": jsonable(self.target_options)})
        return synthetic


# --- transfer evaluation ------------------------------------------------------------------------

def pretrain_on_representations(network: nn.Module, synthetic: SyntheticSet, epochs: int = 1000, lr: float = 0.1,
                                batch_size: int = 256, weight_decay: float = 1e-3,
                                momentum: float = 0.9) -> nn.Module:
    """Pre-train `network` (output as wide as the representation) in place by MSE regression of its output on the
    set's inputs to the set's target representations: shuffled minibatches, SGD, no augmentation, no schedule
    (pretrain_krr_st.py with test.py's values).  Returns the network."""
    if synthetic.meta.get("targets") != "representations":
        raise ConfigError("pretrain_on_representations: the set's labels are not target representations "
                          "(meta 'targets' is not 'representations')")
    device = next(network.parameters()).device
    images, targets = synthetic.inputs().to(device), synthetic.labels.to(device).float()
    stack = StackedModels([network.train()], vectorize=False)  # the engine's stacked trainer, one network
    settings = StackTraining(epochs, lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size)
    train_stack(stack, images, targets, settings, loss_gradient(stack.template, F.mse_loss))
    stack.write_back()
    return network


@dataclass
class TransferOptions:
    """How `transfer_accuracy` evaluates a KRR-ST set (defaults: the authors' test.py).

    Options:
      num_models: networks per start (pre-trained / scratch); test.py --num_test
      model: architecture; None: the one the set was distilled with (and its model_options)
      model_options: options of `model`
      pretrain_epochs: epochs of MSE regression on the set
      pretrain_lr: its SGD lr
      pretrain_batch: its batch size
      pretrain_weight_decay: its weight decay
      probe: "finetune" (the whole network and a new head, test.py) or "linear" (a head on frozen features)
      probe_steps: SGD steps on the task; None: finetune 10000 on CIFAR/TinyImageNet else 5000, linear 5000
      probe_lr: None: finetune 0.01, linear 0.2
      probe_batch: None: finetune 256, linear 512
      probe_weight_decay: None: finetune 5e-4, linear 0
      augment: operations applied in turn to fine-tuning batches (crop+flip as the authors)
      scratch: also the same protocol from random initialisation (test_scratch.py)
      seed: random seed of the evaluation
    """

    num_models: PositiveInt = 3
    model: Optional[str] = None
    model_options: Optional[dict] = None
    pretrain_epochs: PositiveInt = 1000
    pretrain_lr: Positive = 0.1
    pretrain_batch: PositiveInt = 256
    pretrain_weight_decay: NonNegative = 1e-3
    probe: str = "finetune"
    probe_steps: Optional[PositiveInt] = None
    probe_lr: Optional[Positive] = None
    probe_batch: Optional[PositiveInt] = None
    probe_weight_decay: Optional[NonNegative] = None
    augment: str = "crop_flip"
    scratch: bool = True
    seed: int = 0


@dataclass(frozen=True)
class ProbeSettings:
    """SGD (momentum 0.9) with a cosine schedule over `steps` on the labelled task."""

    steps: int
    lr: float
    batch_size: int
    weight_decay: float


def probe_settings(options: TransferOptions, dataset: str) -> ProbeSettings:
    """`options`' probe settings with the authors' values where they are None."""
    if options.probe not in PROBES:
        raise ConfigError(f"transfer: probe must be one of {', '.join(PROBES)}, got {options.probe!r}")
    if options.probe == "finetune":
        defaults = (10000 if dataset in LONG_FINETUNE_DATASETS else 5000, 0.01, 256, 5e-4)
    else:
        defaults = (5000, 0.2, 512, 0.0)
    given = (options.probe_steps, options.probe_lr, options.probe_batch, options.probe_weight_decay)
    return ProbeSettings(*(d if g is None else g for g, d in zip(given, defaults)))


@dataclass
class TransferResult:
    start: str  # "krr_st" (pre-trained on the set) or "scratch"
    probe: str
    accuracies: list[float]  # %, one per network
    mean: float
    std: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskData:
    """A labelled task's splits as network inputs on one device."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def task_data(synthetic: SyntheticSet, data, device: torch.device) -> TaskData:
    """`data` as network inputs: through the set's own input space when it is the dataset the set was distilled
    from, else normalised as kdzoo normalises that dataset ("auto", no whitening), as the authors normalise every
    target dataset with its own constants."""
    train_pixels, train_labels, own = pixel_tensors(data.train)
    test_pixels, test_labels, _ = pixel_tensors(data.test)
    space = synthetic.space
    if space is None or synthetic.meta.get("dataset") != data.name:
        space = build_input_space(data.name, train_pixels, own, "auto", False, "transfer")
    return TaskData(space.to_input(train_pixels.to(device)), train_labels.to(device),
                    space.to_input(test_pixels.to(device)), test_labels.to(device), data.num_classes)


def accuracy_of(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                  chunk: int = 512) -> float:
    with torch.no_grad():
        correct = sum((predict(x).argmax(1) == y).sum().item() for x, y in zip(images.split(chunk), labels.split(chunk)))
    return 100.0 * correct / len(labels)


def train_with_cosine(parameters, loss_of: Callable[[torch.Tensor], torch.Tensor], count: int,
                      settings: ProbeSettings, device: torch.device) -> None:
    """`settings.steps` SGD steps (momentum 0.9, cosine to 0) of ``loss_of(batch indices)`` over `count` items."""
    optimizer = torch.optim.SGD(parameters, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    batches = shuffled_batches(count, settings.batch_size, device)
    for _ in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        loss_of(next(batches)).backward()
        optimizer.step()
        schedule.step()


def finetune_accuracy(network: nn.Module, task: TaskData, settings: ProbeSettings, augment: list[DSA]) -> float:
    """Test accuracy (%) of `network` (with a head for the task's classes) after fine-tuning all of it."""
    network.train()

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(network(apply_chain(augment, task.train_images[index])), task.train_labels[index])

    train_with_cosine(network.parameters(), loss_of, len(task.train_labels), settings, task.train_images.device)
    network.eval()
    return accuracy_of(network, task.test_images, task.test_labels)


def linear_probe_accuracy(network: nn.Module, task: TaskData, settings: ProbeSettings) -> float:
    """Test accuracy (%) of a linear head trained on `network`'s frozen penultimate features (eval mode, no
    augmentation; linear_eval.py)."""
    tap = discover_layout(network, task.train_images[:2]).penultimate
    train_features = representations(network, tap, task.train_images)
    test_features = representations(network, tap, task.test_images)
    with torch.device(task.train_images.device):
        head = nn.Linear(train_features.shape[1], task.num_classes)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(train_features[index]), task.train_labels[index])

    train_with_cosine(head.parameters(), loss_of, len(task.train_labels), settings, train_features.device)
    return accuracy_of(head, test_features, task.test_labels)


def with_new_head(pretrained: Optional[nn.Module], fresh: nn.Module, example: torch.Tensor) -> nn.Module:
    """`fresh` (a classifier for the task) with every tensor of `pretrained` but its head copied in."""
    if pretrained is None:
        return fresh
    head = head_module(fresh, example)
    own = fresh.state_dict()
    copied = {k: v for k, v in pretrained.state_dict().items()
              if k in own and own[k].shape == v.shape and not (head and k.startswith(head + "."))}
    fresh.load_state_dict(copied, strict=False)
    return fresh


def transfer_accuracy(synthetic: SyntheticSet, data, options: Optional[TransferOptions] = None, *,
                      device: str = "auto", progress: bool = False) -> dict[str, TransferResult]:
    """Pre-train `num_models` fresh networks on the KRR-ST set (`pretrain_on_representations`), transfer each to the
    labelled task `data` (fine-tune or linear probe, `TransferOptions.probe`) and report its test accuracy;
    with `scratch`, the same protocol from random initialisation.  Keys: "krr_st" and "scratch"."""
    options = options or TransferOptions()
    settings = probe_settings(options, data.name)
    augment = augment_chain(options.augment, "augment", "transfer")
    if synthetic.meta.get("targets") != "representations":
        raise ConfigError("transfer_accuracy: needs a KRR-ST set (meta 'targets': 'representations')")
    torch_device = resolve_device(device)
    with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
        torch.manual_seed(options.seed)  # the caller's random stream is left as it was
        return transfer_runs(synthetic, data, options, settings, augment, torch_device, progress)


def transfer_runs(synthetic: SyntheticSet, data, options: TransferOptions, settings: ProbeSettings,
                  augment: list[DSA], torch_device: torch.device, progress: bool) -> dict[str, TransferResult]:
    """`transfer_accuracy`'s networks, pre-trained or not, each transferred and tested."""
    task = task_data(synthetic, data, torch_device)
    name = options.model or synthetic.meta.get("model", "convnet:convnet3")
    model_options = options.model_options
    if model_options is None and options.model is None:
        model_options = synthetic.meta.get("model_options")
    channels, size = task.train_images.shape[1], task.train_images.shape[2:]
    dim = synthetic.labels.shape[1]
    starts = ["krr_st", "scratch"] if options.scratch else ["krr_st"]
    results = {}
    for start in starts:
        accuracies, began = [], time.perf_counter()
        for _ in tqdm(range(options.num_models), desc=f"transfer ({start})", disable=not progress, dynamic_ncols=True):
            pretrained = None
            if start == "krr_st":
                pretrained = pretrain_on_representations(
                    build_network(name, dim, channels, size, model_options, torch_device), synthetic,
                    options.pretrain_epochs, options.pretrain_lr, options.pretrain_batch,
                    options.pretrain_weight_decay)
            if options.probe == "finetune":
                fresh = build_network(name, task.num_classes, channels, size, model_options, torch_device)
                network = with_new_head(pretrained, fresh, task.train_images[:2])
                accuracies.append(finetune_accuracy(network, task, settings, augment))
            else:
                features = pretrained if pretrained is not None else build_network(
                    name, dim, channels, size, model_options, torch_device)
                accuracies.append(linear_probe_accuracy(features, task, settings))
        mean = sum(accuracies) / len(accuracies)
        std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies))
        results[start] = TransferResult(start, options.probe, accuracies, mean, std, time.perf_counter() - began)
    return results


def format_transfer(results: dict[str, TransferResult], dataset: str) -> str:
    """A plain-text table of the transfer accuracies."""
    rows = [("start", "probe", "dataset", "networks", "accuracy %")]
    rows += [(r.start, r.probe, dataset, str(len(r.accuracies)), f"{r.mean:.2f} ± {r.std:.2f}")
             for r in results.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


__all__ = ["KRRST", "KRRST_OUTER_LR", "ModelPool", "OnlineTraining", "TransferOptions", "TransferResult",
           "barlow_twins_loss", "format_transfer", "krr_predict", "krr_st_loss", "linear_decay",
           "pretrain_on_representations", "train_barlow_twins", "transfer_accuracy"]
