"""DM: distribution matching (Zhao & Bilen 2023, "Dataset Condensation with Distribution Matching").

Each iteration samples a randomly initialised network and matches, class by class, the mean
embedding (the feature entering the classifier) of DSA-augmented real and synthetic images:
``sum_c || mean(embed(real_c)) - mean(embed(syn_c)) ||^2`` (VICO-UoE/DatasetCondensation main_DM.py).

The reference loops over classes; here one DSA draw per class covers all classes and the real
images go through the network in chunks of `real_chunk` images without a graph, the synthetic ones
in one forward.  With a per-sample norm such as ConvNet's instance norm the loss is the same.
On a GPU one forward of every real image is fastest; on a CPU a whole-batch forward allocates
gigabyte activations per layer every iteration (fresh pages from the kernel each time) and is
slower than the reference's per-class loop, so there the real images go one class at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import register_condenser
from .base import Condenser, EvalProtocol, per_class_mean

DM_PAPER = "Zhao & Bilen 2023, Dataset Condensation with Distribution Matching (WACV)"


def dm_loss(real_embedding: torch.Tensor, syn_embedding: torch.Tensor, classes: int) -> torch.Tensor:
    """Squared distance of the per-class mean embeddings, summed over classes (class-major batches)."""
    return ((per_class_mean(real_embedding, classes) - per_class_mean(syn_embedding, classes)) ** 2).sum()


@register_condenser("dm", paper=DM_PAPER)
@dataclass(eq=False)
class DM(Condenser):
    iterations: int = 20000
    lr_img: float = 1.0
    real_chunk: Optional[int] = None  # real images per graph-free forward; None: all on CUDA, one class on a CPU

    EVAL: ClassVar[EvalProtocol] = EvalProtocol(epochs=1000, augment=True)

    def setup(self) -> None:
        if self.real_chunk is not None and self.real_chunk < 1:
            raise ConfigError(f"{self.registry_name}: real_chunk must be >= 1, got {self.real_chunk}")

    def chunk_size(self, total: int) -> int:
        if self.real_chunk is not None:
            return self.real_chunk
        return total if self.torch_device.type == "cuda" else max(1, total // self.num_classes)

    def real_features(self, network: nn.Module, real: torch.Tensor, taps: list[str],
                      summarise=lambda features: features) -> list[torch.Tensor]:
        """`summarise(features)` of the real images, computed chunk by chunk without a graph and concatenated."""
        with torch.no_grad():
            parts = [summarise(self.features(network, chunk, taps)) for chunk in real.split(self.chunk_size(len(real)))]
        return [torch.cat(column) for column in zip(*parts)]

    def matching_loss(self) -> torch.Tensor:
        network = self.new_network().requires_grad_(False)
        real, _ = self.real.per_class(self.batch_real)
        syn, _ = self.synthetic_batch()
        real, syn = self.siamese(real, syn)
        embedding = [self.layout(network).penultimate]
        (real_embedding,) = self.real_features(network, real, embedding)
        (syn_embedding,) = self.features(network, syn, embedding)
        return dm_loss(real_embedding, syn_embedding, self.num_classes)


__all__ = ["DM", "dm_loss"]
