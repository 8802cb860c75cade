"""DataDAM: attention matching (Sajedi et al. 2023, "DataDAM: Efficient Dataset Distillation with
Attention Matching").

Each iteration samples a randomly initialised network.  For every block but the last, the spatial
attention map of an image (sum over channels of |activation|^p, flattened, L2-normalised) is
averaged over each class and matched between DSA-augmented real and synthetic images; the final
embeddings are matched by their class means (an MMD with a linear kernel), weighted by
`task_balance`.  As in the authors' code: activations after each block's ReLU, before pooling,
and loss = 100 x (attention + task_balance x embedding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Condenser, EvalProtocol, per_class_mean, register_condenser

DATADAM_PAPER = "Sajedi et al. 2023, DataDAM: Efficient Dataset Distillation with Attention Matching (ICCV)"


def spatial_attention(feature: torch.Tensor, power: float) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, H*W): sum over channels of |f|^p, L2-normalised per image."""
    return F.normalize(feature.abs().pow(power).sum(1).flatten(1), dim=1)


@register_condenser("datadam", paper=DATADAM_PAPER)
@dataclass(eq=False)
class DataDAM(Condenser):
    iterations: int = 20000
    lr_img: float = 1.0
    batch_real: int = 64
    attention_power: float = 1.0
    task_balance: float = 0.01  # weight of the embedding term against the attention terms
    loss_scale: float = 100.0

    EVAL: ClassVar[EvalProtocol] = EvalProtocol(epochs=1000, augment=True)

    def matching_loss(self) -> torch.Tensor:
        network = self.new_network().requires_grad_(False)
        layout = self.layout(network)
        # Published per-block activations (ConvNet: each block's ReLU) or else the stage outputs.
        attention_taps = layout.extra.get("act", layout.stages)[:-1]
        taps = [*attention_taps, layout.penultimate]
        real, _ = self.real.per_class(self.batch_real)
        syn, _ = self.synthetic_batch()
        real, syn = self.siamese(real, syn)
        with torch.no_grad():
            real_features = self.features(network, real, taps)
        syn_features = self.features(network, syn, taps)
        k = self.num_classes
        attention = sum(((per_class_mean(spatial_attention(r, self.attention_power), k)
                          - per_class_mean(spatial_attention(s, self.attention_power), k)) ** 2).sum()
                        for r, s in zip(real_features[:-1], syn_features[:-1]))
        embedding = ((per_class_mean(real_features[-1], k) - per_class_mean(syn_features[-1], k)) ** 2).sum()
        return self.loss_scale * (attention + self.task_balance * embedding)
