"""What the decoupled dataset-distillation methods share (squeeze, recover/select, relabel: SRe2L, RDED, CV-DD,
INFER, NRR-DD): an observer model trained on the real data, the BatchNorm-statistics matching of SRe2L's recover
stage, and an evaluation that replays the observer's soft labels on random crops (see `EvalProtocol`).

    class MyMethod(ObserverCondenser):       # self.observer_network: the frozen observer (eval mode)
        def matching_loss(self):
            with BatchNormStatistics(self.observer_network) as statistics:
                logits = self.observer_network(self.images)
            return F.cross_entropy(logits, self.labels) + 0.01 * statistics.loss(first_multiplier=10)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..engine.stacked import StackedModels, StackTraining
from ..errors import ConfigError
from ..registry import NonNegativeInt, Positive, PositiveInt
from .base import Condenser, EvalProtocol, SyntheticSet, jsonable
from .evaluate import accuracy, train_networks
from .observer import SOURCES, ObserverSpec, frozen, load_observer, new_observer, read_saved_observer, save_observer

# SRe2L's validation of its relabelled sets (validate/train_FKD.sh): AdamW lr 1e-3, weight decay 0.01, cosine per
# epoch, crops of scale (0.08, 1) with CutMix, soft labels at T = 20.  Epochs and batch size vary by dataset; the
# methods set them.
SOFT_LABEL_EVAL = EvalProtocol(epochs=300, augment=True, lr=1e-3, batch_size=128, teacher_labels="online",
                               temperature=20.0, optimizer="adamw", weight_decay=0.01, schedule="cosine",
                               crop_scale=(0.08, 1.0), mix="cutmix")


def bn_statistics_loss(batch_mean: torch.Tensor, batch_var: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor) -> torch.Tensor:
    """SRe2L's BN matching for one layer (recover/utils.py `BNFeatureHook`): ||mu_batch - mu_running||_2 +
    ||sigma^2_batch - sigma^2_running||_2, Euclidean norms (not squared) over the channels."""
    return torch.linalg.vector_norm(running_var - batch_var) + torch.linalg.vector_norm(running_mean - batch_mean)


def channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over batch and space: what a BatchNorm layer normalises with."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=False)


class BatchNormStatistics:
    """Within the block, every forward of `model` records for each BatchNorm layer (in forward order)
    `bn_statistics_loss` of the layer's input against the layer's running statistics; `loss()` sums them,
    the first layer weighted by `first_multiplier` (SRe2L's ``--first-bn-multiplier``)."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.layers:
            raise ConfigError(f"{type(model).__name__} has no BatchNorm layer, so there are no statistics to match; "
                              "use an observer with BatchNorm (e.g. observer_options.norm=batchnorm for ConvNet)")
        self.losses: list[torch.Tensor] = []
        self._handles: list = []

    def _record(self, module: nn.Module, inputs, output) -> None:
        mean, var = channel_statistics(inputs[0])
        self.losses.append(bn_statistics_loss(mean, var, module.running_mean, module.running_var))

    def __enter__(self) -> "BatchNormStatistics":
        self.losses = []
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def loss(self, first_multiplier: float = 1.0) -> torch.Tensor:
        if not self.losses:
            raise ConfigError("BatchNormStatistics: no forward pass was recorded")
        return first_multiplier * self.losses[0] + sum(self.losses[1:], torch.zeros_like(self.losses[0]))


def squeeze(condenser: Condenser, spec: ObserverSpec, settings: StackTraining, progress: bool,
            seed: Optional[int] = None) -> nn.Module:
    """Train one `spec` network on the condenser's real images (its input space and DSA augmentation, SGD with a
    step decay at half time): the squeeze stage, our CPU-sized recipe (SRe2L trains its squeeze ResNets for
    hundreds of epochs with crops and flips).  Depends on `seed` only (default: the condenser's), so several
    observers of one architecture differ by their seeds."""
    device = condenser.torch_device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(condenser.seed if seed is None else seed)
        network = new_observer(spec, device)
        stack = train_networks([network], condenser.real.images, condenser.real.labels, settings,
                               augment=condenser.dsa, progress=f"squeeze {spec.model}" if progress else None)
        stack.write_back()
    return frozen(network)


@dataclass(eq=False)
class ObserverCondenser(Condenser):
    """A condenser with an observer model (`observer_network`, frozen, eval mode) and the soft-label evaluation."""

    observer: str = "squeeze"  # squeeze | pretrained | a weights file or run folder (see kdzoo.condense.observer)
    observer_model: str = "convnet:convnet3"
    observer_options: Optional[dict] = None  # None: {"norm": "batchnorm"} for ConvNet (BN statistics are matched)
    observer_epochs: NonNegativeInt = 50  # squeeze epochs (ours; SRe2L squeezes for hundreds of epochs)
    observer_lr: Positive = 0.01
    observer_batch: PositiveInt = 256
    observer_file: Optional[str] = None  # where a squeezed observer is saved and reused

    EVAL: ClassVar[EvalProtocol] = SOFT_LABEL_EVAL

    def observer_spec(self) -> ObserverSpec:
        options = self.observer_options
        if options is None and self.observer_model.startswith("convnet:"):
            options = {"norm": "batchnorm"}
        return ObserverSpec(self.observer, self.observer_model, options, self.num_classes, self.channels,
                            self.image_size)

    def observer_meta(self) -> dict[str, Any]:
        """What a squeezed observer depends on: a saved one is reused only when all of it matches."""
        return jsonable({**self.observer_spec().meta(), "dataset": self.data.name, "input_space": self.space.meta(),
                         "train_images": len(self.real.labels), "epochs": self.observer_epochs,
                         "lr": self.observer_lr, "batch": self.observer_batch, "dsa_strategy": self.dsa_strategy,
                         "seed": self.seed})

    def squeeze_settings(self) -> StackTraining:
        epochs = self.observer_epochs
        return StackTraining(epochs, self.observer_lr, batch_size=self.observer_batch, decay_epoch=epochs // 2)

    @cached_property
    def observer_network(self) -> nn.Module:
        """Built on first use (so a run's progress setting applies), then kept.  Squeezing it or reading it back
        leaves the global random stream as it was, so a resumed run continues the same stream."""
        devices = [self.torch_device] if self.torch_device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._build_observer()

    def _build_observer(self) -> nn.Module:
        spec = self.observer_spec()
        if self.observer not in SOURCES:
            return load_observer(spec, self.torch_device)
        if self.observer == "pretrained":
            return load_observer(spec, self.torch_device)
        meta = self.observer_meta()
        if self.observer_file:
            saved = read_saved_observer(self.observer_file, spec, meta, self.torch_device)
            if saved is not None:
                return saved
        if self.observer_epochs < 1:
            raise ConfigError(f"{self.registry_name}: observer=squeeze needs observer_epochs >= 1")
        network = squeeze(self, spec, self.squeeze_settings(), self.progress)
        if self.observer_file:
            save_observer(self.observer_file, network, meta)
        return network

    def observer_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 % of the observer on network inputs (e.g. the test split mapped through `self.space`)."""
        stack = StackedModels([self.observer_network])
        return float(accuracy(stack.eval(), images.to(self.torch_device), labels.to(self.torch_device))[0]) * 100

    def observer_description(self) -> dict[str, Any]:
        """The observer as the set's metadata records it, with the file the evaluation can load it from."""
        description = {**self.observer_spec().meta(), "source": self.observer}
        if self.observer not in SOURCES:
            description["file"] = str(Path(self.observer).resolve())
        elif self.observer == "squeeze" and self.observer_file and Path(self.observer_file).is_file():
            description["file"] = str(Path(self.observer_file).resolve())
        return jsonable(description)

    def evaluation_teacher(self) -> nn.Module:
        """The model whose soft labels the evaluation replays (CV-DD: its committee)."""
        return self.observer_network

    def result(self) -> SyntheticSet:
        teacher = self.evaluation_teacher()  # first: a run of 0 iterations squeezes (and saves) the observer here
        synthetic = super().result()
        synthetic.meta["observer"] = self.observer_description()
        synthetic.teacher = teacher
        return synthetic


def clamp_to_pixels(condenser: Condenser, images: torch.Tensor) -> None:
    """Keep network-input images inside the valid pixel range [0, 1] of their input space, in place (SRe2L's
    `clip` after every step).  Whitened spaces and data without a known pixel range are left alone."""
    space = condenser.space
    if space.whitened or not space.pixels:
        return
    with torch.no_grad():
        images.copy_(space.to_input(space.to_pixels(images).clamp_(0, 1)))


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, iteration: int, iterations: int) -> None:
    """SRe2L's `lr_cosine_policy` without warm-up: lr = base 0.5 (1 + cos(pi i / I))."""
    for group in optimizer.param_groups:
        group["lr"] = 0.5 * (1 + math.cos(math.pi * iteration / max(1, iterations))) * base_lr


__all__ = ["ObserverCondenser", "BatchNormStatistics", "bn_statistics_loss", "channel_statistics", "squeeze",
           "SOFT_LABEL_EVAL", "clamp_to_pixels", "cosine_lr"]
