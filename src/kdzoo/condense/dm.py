"""DM: distribution matching (Zhao & Bilen 2023, "Dataset Condensation with Distribution Matching").

Each iteration samples a randomly initialised network and matches, class by class, the mean
embedding (the feature entering the classifier) of DSA-augmented real and synthetic images.  All
classes go through one forward (the reference loops over classes); with a per-sample norm such as
ConvNet's instance norm the result is the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Condenser, EvalProtocol, per_class_mean, register_condenser

DM_PAPER = "Zhao & Bilen 2023, Dataset Condensation with Distribution Matching (WACV)"


@register_condenser("dm", paper=DM_PAPER)
@dataclass(eq=False)
class DM(Condenser):
    iterations: int = 20000
    lr_img: float = 1.0

    EVAL: ClassVar[EvalProtocol] = EvalProtocol(epochs=1000, augment=True)

    def matching_loss(self) -> torch.Tensor:
        network = self.new_network().requires_grad_(False)
        real, _ = self.real.per_class(self.batch_real)
        syn, _ = self.synthetic_batch()
        real, syn = self.siamese(real, syn)
        embedding = [self.layout(network).penultimate]
        with torch.no_grad():
            (real_embedding,) = self.features(network, real, embedding)
        (syn_embedding,) = self.features(network, syn, embedding)
        gap = per_class_mean(real_embedding, self.num_classes) - per_class_mean(syn_embedding, self.num_classes)
        return (gap ** 2).sum()
