"""DC (gradient matching) and DSA (gradient matching through differentiable siamese augmentation).

Zhao, Mopuri & Bilen 2021, "Dataset Condensation with Gradient Matching"; Zhao & Bilen 2021,
"Dataset Condensation with Differentiable Siamese Augmentation".  Per class, the gradient of the
cross-entropy w.r.t. a network's weights on real images is matched by the one on synthetic images;
the network is trained on the synthetic set between matchings (outer/inner loops).  All classes'
gradients come from one `vmap(grad(...))` instead of the reference's loop over classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..engine.optim import descend
from ..errors import ConfigError
from ..registry import register_condenser
from .base import Condenser, EvalProtocol, fyi_expand, nearest_ipc

DC_PAPER = "Zhao, Mopuri & Bilen 2021, Dataset Condensation with Gradient Matching (ICLR)"
DSA_PAPER = "Zhao & Bilen 2021, Dataset Condensation with Differentiable Siamese Augmentation (ICML)"

# (outer loop, inner loop) per images-per-class, the reference's empirically good values;
# other IPCs take the nearest listed IPC's loops.
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
DISTANCES = ("ours", "mse", "cos")
BATCHNORM_REAL_PER_CLASS = 16  # real images per class that set frozen BatchNorm statistics


def per_class_gradients(network: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        classes: int) -> dict[str, torch.Tensor]:
    """Gradient of each class's mean cross-entropy w.r.t. the network's weights: name -> (classes, *shape).

    `images` is class-major (equal count per class).  Differentiable w.r.t. `images`."""
    params = {k: v.detach() for k, v in network.named_parameters()}
    buffers = dict(network.named_buffers())

    def loss(p, x, y):
        return F.cross_entropy(functional_call(network, (p, buffers), (x,)), y)

    x = images.view(classes, -1, *images.shape[1:])
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels.view(classes, -1))


def gradient_distance(g_syn: dict[str, torch.Tensor], g_real: dict[str, torch.Tensor], metric: str = "ours") -> torch.Tensor:
    """Distance between per-class gradients, summed over classes.

    "ours" (the DC paper's layer-wise distance): per output unit of every weight tensor,
    1 - cosine(syn, real) of its incoming weights' gradients; 1-D tensors (biases, norm affines)
    count zero, as in the reference.  "mse": squared error of all gradients; "cos": 1 - cosine of
    each class's whole gradient vector."""
    pairs = [(g_syn[k], g_real[k]) for k in g_real]
    if metric == "ours":
        total = 0.0
        for s, r in pairs:
            if s.dim() <= 2:  # (classes, C): a 1-D parameter
                continue
            s, r = s.reshape(*s.shape[:2], -1), r.reshape(*r.shape[:2], -1)
            cosine = (s * r).sum(-1) / (s.norm(dim=-1) * r.norm(dim=-1) + 1e-6)
            total = total + (1 - cosine).sum()
        return total
    if metric == "mse":
        return sum(((s - r) ** 2).sum() for s, r in pairs)
    dot = sum((s * r).flatten(1).sum(1) for s, r in pairs)
    norm_s = torch.sqrt(sum((s * s).flatten(1).sum(1) for s, _ in pairs))
    norm_r = torch.sqrt(sum((r * r).flatten(1).sum(1) for _, r in pairs))
    return (1 - dot / (norm_s * norm_r + 1e-6)).sum()


@register_condenser("dc", paper=DC_PAPER)
@dataclass(eq=False)
class DC(Condenser):
    """Gradient matching.  One iteration: a fresh network; `outer_loop` times match the gradients
    and update the images, then train the network `inner_loop` epochs on the synthetic set."""

    iterations: int = 1000
    lr_img: float = 0.1
    init: str = "noise"
    dsa_strategy: str = "none"
    lr_net: float = 0.01  # SGD (no momentum) of the network between matchings
    batch_train: int = 256
    outer_loop: Optional[int] = None  # None: the reference's value for this IPC
    inner_loop: Optional[int] = None
    distance: str = "ours"

    # Published DC numbers: 300 epochs without augmentation (ConvNet on CIFAR).
    EVAL: ClassVar[EvalProtocol] = EvalProtocol(epochs=300, augment=False)

    def setup(self) -> None:
        if self.distance not in DISTANCES:
            raise ConfigError(f"{self.registry_name}: distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        outer, inner = nearest_ipc(LOOPS, self.ipc)
        self.outer = self.outer_loop if self.outer_loop is not None else outer
        self.inner = self.inner_loop if self.inner_loop is not None else inner

    def matching_loss(self) -> torch.Tensor:
        network = self.new_network()
        self.freeze_batchnorm(network)
        return self.gradient_matching_loss(network)

    def gradient_matching_loss(self, network: nn.Module) -> torch.Tensor:
        real, real_labels = self.real.per_class(self.batch_real)
        syn, syn_labels = self.synthetic_batch()
        real, syn = self.siamese(real, syn)
        g_real = per_class_gradients(network, real, real_labels, self.num_classes)
        g_syn = per_class_gradients(network, syn, syn_labels, self.num_classes)
        return gradient_distance(g_syn, g_real, self.distance)

    def step(self) -> float:
        network = self.new_network()
        optimizer = torch.optim.SGD(network.parameters(), lr=self.lr_net)
        total = 0.0
        for outer in range(self.outer):
            self.freeze_batchnorm(network)
            loss = self.gradient_matching_loss(network)
            self.update(loss)
            total += loss.item()
            if outer == self.outer - 1:
                break
            self.train_network(network, optimizer)
        return total / self.outer

    def freeze_batchnorm(self, network: nn.Module) -> None:
        """A synthetic class batch (even one image) cannot give batch statistics: set BatchNorm's
        running statistics from real images of every class, then keep them fixed while matching."""
        norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        network.train()
        with torch.no_grad():
            network(self.real.per_class(BATCHNORM_REAL_PER_CLASS)[0])
        for m in norms:
            m.eval()

    def train_network(self, network: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """`inner_loop` epochs of the network on the (detached) synthetic set, one DSA operation per batch."""
        network.train()
        images, labels = self.images.detach(), self.labels
        for _ in range(self.inner):
            for index in torch.randperm(len(images), device=images.device).split(self.batch_train):
                x, y = images[index], labels[index]
                if self.fyi:  # FYI's BatchAug in the inner loop: the batch plus a full batch of its flips
                    x, y = fyi_expand(x, y, 1)
                descend([optimizer], F.cross_entropy(network(self.dsa.augment(x)), y))


@register_condenser("dsa", paper=DSA_PAPER)
@dataclass(eq=False)
class DSAMatching(DC):
    """DC with every real/synthetic class pair augmented by one shared DSA draw (and the inner
    network training augmented too)."""

    init: str = "real"
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"

    EVAL: ClassVar[EvalProtocol] = EvalProtocol(epochs=1000, augment=True)
