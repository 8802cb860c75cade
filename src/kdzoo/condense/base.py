"""What every dataset-distillation method shares: the synthetic set, the real images by class, the
condenser base class (learnable images, optimizer, siamese augmentation, FYI flips, checkpointable
state) and the loop that runs a condenser with progress bars, checkpoints and resume.

A method subclasses `Condenser` as a dataclass: its options are fields whose defaults live beside
the code (the registry reads them from the generated signature), and it implements
`matching_loss()`, the loss of one random draw (networks, real batch, augmentation) with a graph to
the synthetic images.  `step()` (one outer iteration) defaults to one update with that loss.
"""
from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..engine.checkpoint import read_weights
from ..engine.optim import descend
from ..engine.runtime import atomic_write, resolve_device
from ..errors import CheckpointError, ConfigError
from ..models import MODELS, convnet, create_model  # noqa: F401  (convnet registers ConvNet-3, the default)
from ..registry import CONDENSERS, NonNegativeInt, Positive, PositiveInt, UnitInterval
from ..taps import Layout, Taps, discover_layout
from .augment import DSA, DSA_STRATEGY
from .space import InputSpace, build_input_space, pixel_tensors, split_tensors  # noqa: F401  (re-exported)

MAX_ITERATIONS = 10_000_000  # 60x the longest schedule a paper uses (KRR-ST's 160,000): more is a typo


@dataclass(frozen=True)
class EvalProtocol:
    """How a method's synthetic set is evaluated in its paper: fresh networks trained for `epochs`
    with SGD (momentum 0.9, weight decay 5e-4, lr x0.1 at half time) in minibatches of `batch_size`."""

    epochs: int = 1000
    augment: bool = True  # DSA augmentation (the set's own strategy) while the fresh networks train
    lr: float = 0.01
    learned_lr: bool = False  # trajectory matching learns the step size; evaluate with it
    batch_size: int = 256  # the references' batch_train
    # The decoupled methods' protocol (SRe2L, RDED, CV-DD, ...): "online" trains on random resized crops (+ flip,
    # + CutMix per batch) labelled by the set's observer (or committee) at `temperature`, with `optimizer` and
    # `schedule`; "none" trains on the stored labels with DSA as above.
    teacher_labels: str = "none"
    temperature: float = 1.0
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    schedule: str = "step"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    mix: str = "cutmix"
    patch_shuffle: int = 1  # RDED with factor > 1: each image's factor x factor patches shuffled before its crop


@dataclass
class SyntheticSet:
    """Distilled images with hard (N,) or soft (N, classes) labels.

    With a `space` (what `condense` returns) the images are in pixel space and `space` maps them to
    the network inputs the set was distilled in (per-channel normalisation or ZCA whitening); without
    one the images are network inputs already."""

    images: torch.Tensor
    labels: torch.Tensor
    learned_lr: Optional[float] = None
    meta: dict[str, Any] = field(default_factory=dict)
    space: Optional[InputSpace] = None
    # The model whose soft labels the evaluation replays (a decoupled method's observer or committee; logits
    # out).  Not saved with the set: its weights sit beside it (meta["observer"]["file"]).
    teacher: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def soft(self) -> bool:
        return self.labels.is_floating_point()

    def inputs(self) -> torch.Tensor:
        """The images as the networks see them."""
        return self.images if self.space is None else self.space.to_input(self.images)

    def save(self, path: str | Path) -> None:
        """images + labels (+ the fitted whitening) as safetensors; `meta`, the input space and the learned
        step size as JSON metadata."""
        tensors = {"images": self.images.detach().cpu().contiguous(), "labels": self.labels.detach().cpu().contiguous()}
        extra = {}
        if self.space is not None:
            tensors.update(self.space.tensors())
            extra["input_space"] = self.space.meta()
        meta = json.dumps({**self.meta, **extra, "learned_lr": self.learned_lr})
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"kdzoo": meta}))

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        tensors, meta = read_weights(path)
        if not {"images", "labels"} <= set(tensors):
            raise CheckpointError(f"{path}: not a synthetic set (needs tensors 'images' and 'labels')")
        learned_lr = meta.pop("learned_lr", None)
        space_meta = meta.pop("input_space", None)
        try:
            space = InputSpace.from_saved(space_meta, tensors) if space_meta is not None else None
        except ConfigError as err:
            raise CheckpointError(f"{path}: {err}") from None
        return cls(tensors["images"], tensors["labels"], learned_lr, meta, space)


class RealImages:
    """A split's images (network inputs) and labels on one device, with per-class random sampling that
    stays there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, device: torch.device):
        self.images, self.labels = images.to(device), labels.to(device)
        self.num_classes, self.device = num_classes, device
        members = [(labels == c).nonzero().squeeze(1) for c in range(num_classes)]
        empty = [c for c, m in enumerate(members) if len(m) == 0]
        if empty:
            raise ConfigError(f"the training split has no images of class(es) {empty}")
        self.class_counts = torch.tensor([len(m) for m in members])
        # Padded (classes, largest class) index table so sampling all classes is one argsort.
        self.class_index = torch.nn.utils.rnn.pad_sequence(members, batch_first=True).to(device)
        self.class_valid = (torch.arange(self.class_index.shape[1]) < self.class_counts.view(-1, 1)).to(device)

    @property
    def smallest_class(self) -> int:
        return int(self.class_counts.min())

    def per_class(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` random images of every class (capped at the smallest class), class by class."""
        n = min(n, self.smallest_class)
        keys = torch.rand(self.class_index.shape, device=self.device).masked_fill(~self.class_valid, 2.0)
        index = self.class_index.gather(1, keys.argsort(1)[:, :n]).flatten()
        return self.images[index], self.labels[index]


def build_network(name: str, num_classes: int, in_channels: int, image_size, options: Optional[dict],
                  device: torch.device) -> nn.Module:
    """A freshly initialised zoo model, created directly on `device`; ConvNet learns the image size."""
    options = dict(options or {})
    if name in MODELS and "image_size" in MODELS.get(name).defaults:
        options.setdefault("image_size", tuple(image_size))
    with torch.device(device):
        return create_model(name, num_classes=num_classes, in_channels=in_channels, **options)


def fyi_expand(images: torch.Tensor, labels: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FYI (Son et al. 2024): every synthetic image also enters matching horizontally flipped, so one
    image need not show a discriminative part on both sides.  Each of `groups` consecutive chunks
    (one per class) keeps its flips inside it, so class-major layouts stay class-major."""
    x = images.view(groups, -1, *images.shape[1:])
    y = labels.view(groups, -1, *labels.shape[1:])
    return torch.cat([x, x.flip(-1)], 1).flatten(0, 1), torch.cat([y, y], 1).flatten(0, 1)


def check_iterations(options: dict[str, Any], where: str = "") -> None:
    """Refuse a negative or absurd ``iterations`` (an accepted 10**30 would run until killed), before any data is
    read: the annotations bound it below only, a subclass may redeclare it."""
    value = options.get("iterations")
    if isinstance(value, int) and not 0 <= value <= MAX_ITERATIONS:
        raise ConfigError(f"{where}iterations: must be between 0 and {MAX_ITERATIONS:,}, got {value}")


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


@dataclass(eq=False)
class Condenser(ABC):
    """Learnable synthetic images (`ipc` per class) and the shared machinery of the methods."""

    data: Any = field(repr=False)  # kdzoo.data.DataSplits
    ipc: int
    iterations: NonNegativeInt = 1000
    lr_img: Positive = 0.1
    momentum_img: UnitInterval = 0.5
    init: str = "real"  # "real": random real images of each class; "noise": standard normal pixels
    model: str = "convnet:convnet3"
    model_options: Optional[dict] = None
    dsa_strategy: str = DSA_STRATEGY  # "none" switches augmentation off
    batch_real: Optional[PositiveInt] = 256  # real images per class in one matching draw
    normalize: str = "auto"  # "auto": DatasetCondensation's constants for cifar10/cifar100/fashion_mnist
    zca: Optional[bool] = None  # ZCA-whiten the pixels (kornia, eps 0.1); None: the method's default
    fyi: bool = False
    committee_labels: bool = False  # fixed soft labels: a committee's vote on the final images (not per batch)
    committee: str = "convnet:convnet3"  # comma-separated architectures of the committee
    committee_size: PositiveInt = 5
    committee_epochs: NonNegativeInt = 30
    label_temperature: Positive = 1.0
    seed: int = 0
    device: str = "auto"

    EVAL: ClassVar[EvalProtocol] = EvalProtocol()
    registry_name: ClassVar[str]

    def __post_init__(self) -> None:
        if self.ipc < 1:
            raise ConfigError(f"{self.registry_name}: ipc must be at least 1, got {self.ipc}")
        if self.init not in ("real", "noise"):
            raise ConfigError(f"{self.registry_name}: init must be 'real' or 'noise', got {self.init!r}")
        check_iterations({"iterations": self.iterations}, f"{self.registry_name}: ")
        self.resolve_options()
        self.torch_device = resolve_device(self.device)
        torch.manual_seed(self.seed)
        self.num_classes = self.data.num_classes
        self.channels = self.data.in_channels
        self.image_size = tuple(self.data.image_size)
        self.use_zca = self.default_zca() if self.zca is None else bool(self.zca)
        pixels, labels, own = pixel_tensors(self.data.train)
        pixels = pixels.to(self.torch_device)
        self.space = build_input_space(self.data.name, pixels, own, self.normalize, self.use_zca, self.registry_name)
        self.real = RealImages(self.space.to_input(pixels), labels, self.num_classes, self.torch_device)
        del pixels  # the network inputs are what the methods use
        self.dsa = DSA(self.dsa_strategy)
        self.labels = torch.arange(self.num_classes, device=self.torch_device).repeat_interleave(self.ipc)
        self.images = self.initial_images().requires_grad_(True)
        self.image_optimizer = torch.optim.SGD([self.images], lr=self.lr_img, momentum=self.momentum_img)
        self.history: list[float] = []
        self.progress = True  # progress bars of long preparations (experts, committee); set by run_condenser
        self._layout: Optional[Layout] = None
        self.setup()

    # -- hooks for the methods ------------------------------------------------------------------
    def resolve_options(self) -> None:
        """Fill options left None with the method's per-dataset/IPC defaults; refuse ignored ones."""

    def default_zca(self) -> bool:
        """Whether the method whitens by default (MTT/FTD: on CIFAR, as the authors' scripts)."""
        return False

    def setup(self) -> None:
        """Method-specific preparation after the images exist (expert trajectories, EMA, ...)."""

    @abstractmethod
    def matching_loss(self) -> torch.Tensor:
        """The method's loss for one random draw, differentiable w.r.t. the synthetic images."""

    def step(self) -> float:
        """One outer iteration; returns its loss."""
        loss = self.matching_loss()
        self.update(loss)
        return loss.item()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.image_optimizer]

    def after_update(self) -> None:
        """Called after every optimizer step (FTD keeps its moving average here)."""

    def final_images(self) -> torch.Tensor:
        return self.images

    def learned_lr(self) -> Optional[float]:
        return None

    # -- shared machinery -----------------------------------------------------------------------
    def initial_images(self) -> torch.Tensor:
        shape = (self.num_classes * self.ipc, self.channels, *self.image_size)
        if self.init == "noise":
            return torch.randn(shape, device=self.torch_device)
        if self.real.smallest_class < self.ipc:
            raise ConfigError(f"{self.registry_name}: init=real needs {self.ipc} images per class, the smallest "
                              f"class has {self.real.smallest_class}; use init=noise or a smaller ipc")
        return self.real.per_class(self.ipc)[0].clone()

    def update(self, loss: torch.Tensor) -> None:
        descend(self.optimizers(), loss)
        self.after_update()

    def new_network(self, name: Optional[str] = None, options: Optional[dict] = None) -> nn.Module:
        """A freshly initialised network in training mode (the condenser's model by default)."""
        options = self.model_options if name is None else options
        return build_network(name or self.model, self.num_classes, self.channels, self.image_size, options,
                             self.torch_device)

    def synthetic_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All synthetic images class by class (with their flips under FYI) and their labels."""
        if self.fyi:
            return fyi_expand(self.images, self.labels, self.num_classes)
        return self.images, self.labels

    def siamese(self, real: torch.Tensor, syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DSA draw per class, applied identically to the real and the synthetic images of the class."""
        if not self.dsa.enabled:
            return real, syn
        draw = self.dsa.draw(self.num_classes, self.torch_device)
        return self.dsa.apply(real, draw), self.dsa.apply(syn, draw)

    def layout(self, network: nn.Module) -> Layout:
        """Where `network`'s stages and penultimate feature are (found once per condenser)."""
        if self._layout is None:
            self._layout = discover_layout(network, self.real.images[:2])
        return self._layout

    @staticmethod
    def features(network: nn.Module, x: torch.Tensor, taps: list[str]) -> list[torch.Tensor]:
        with Taps(network, taps) as t:
            network(x)
            return [t.get(tap) for tap in taps]

    def fixed_draw_loss(self, seed: int) -> float:
        """`matching_loss()` of the current images under a fixed random draw; touches no state."""
        devices = [self.torch_device] if self.torch_device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.matching_loss().item()

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "data"}

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.detach().cpu(), "history": list(self.history),
                "optimizers": [o.state_dict() for o in self.optimizers()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.torch_device))
        self.history = list(state["history"])
        for optimizer, saved in zip(self.optimizers(), state["optimizers"]):
            optimizer.load_state_dict(saved)

    def result(self) -> SyntheticSet:
        """The synthetic set now, in pixel space with its input space and hard labels (`run.final_set` adds a
        committee's soft labels when asked for)."""
        images = self.final_images().detach().clone()
        labels = self.labels.clone()
        meta = {"method": self.registry_name, "dataset": self.data.name, "ipc": self.ipc,
                "num_classes": self.num_classes, "image_size": list(self.image_size), "model": self.model,
                "model_options": jsonable(self.model_options), "options": jsonable(self.options()),
                "dsa_strategy": self.dsa_strategy, "zca": self.use_zca,
                "eval": dataclasses.asdict(self.EVAL), "iterations_done": len(self.history)}
        pixels = self.space.to_pixels(images)
        return SyntheticSet(pixels.cpu(), labels.cpu(), self.learned_lr(), meta, self.space)


def build_condenser(method: str, data, ipc: int, **options: Any) -> Condenser:
    """A registered condenser by name; unknown names and options are one-line `ConfigError`s."""
    return CONDENSERS.build(method, data, ipc, **options)


def nearest_ipc(table: dict[int, Any], ipc: int) -> Any:
    """A per-IPC setting of a paper; IPCs it does not list take the nearest listed one (the smaller on ties)."""
    return table[min(table, key=lambda k: (abs(k - ipc), k))]


def per_class_mean(x: torch.Tensor, classes: int) -> torch.Tensor:
    """Mean over each class's consecutive rows of a class-major batch: (classes, features)."""
    return x.reshape(classes, -1, x[0].numel()).mean(1)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices or against soft label distributions."""
    return F.cross_entropy(logits, targets)
