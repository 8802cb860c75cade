"""DataDAM: attention matching (Sajedi et al. 2023, "DataDAM: Efficient Dataset Distillation with
Attention Matching").

Each iteration samples a randomly initialised network.  For every block but the last, the spatial
attention map of an image (sum over channels of |activation|^p, flattened, L2-normalised) is
averaged over each class and matched between DSA-augmented real and synthetic images; the final
embeddings are matched by their class means (an MMD with a linear kernel), weighted by
`task_balance`.  As in the authors' main_DataDAM.py: activations after each block's ReLU, before
pooling, attention of all ReLUs but the last, ``get_attention(param=1, exp=1, norm='l2')``,
``loss = 100 * sum(attention MSE_B) + 100 * task_balance * embedding MSE_B``, batch_real 64, and the
evaluation's 1800 epochs with batch 64 (``epoch_eval_train``, ``batch_train``).  The real images go
through the network in chunks as in DM (see `DM.real_chunk`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..registry import register_condenser
from .base import EvalProtocol, per_class_mean
from .dm import DM

DATADAM_PAPER = "Sajedi et al. 2023, DataDAM: Efficient Dataset Distillation with Attention Matching (ICCV)"


def spatial_attention(feature: torch.Tensor, power: float) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, H*W): sum over channels of |f|^p, L2-normalised per image."""
    return F.normalize(feature.abs().pow(power).sum(1).flatten(1), dim=1)


def datadam_loss(real_attention: Sequence[torch.Tensor], syn_attention: Sequence[torch.Tensor],
                 real_embedding: torch.Tensor, syn_embedding: torch.Tensor, classes: int,
                 task_balance: float = 0.01, scale: float = 100.0) -> torch.Tensor:
    """DataDAM's loss from class-major attention maps (one per matched layer) and final embeddings."""
    attention = sum(((per_class_mean(r, classes) - per_class_mean(s, classes)) ** 2).sum()
                    for r, s in zip(real_attention, syn_attention))
    embedding = ((per_class_mean(real_embedding, classes) - per_class_mean(syn_embedding, classes)) ** 2).sum()
    return scale * (attention + task_balance * embedding)


@register_condenser("datadam", paper=DATADAM_PAPER)
@dataclass(eq=False)
class DataDAM(DM):
    iterations: int = 20000
    lr_img: float = 1.0
    batch_real: int = 64
    attention_power: float = 1.0
    task_balance: float = 0.01  # weight of the embedding term against the attention terms
    loss_scale: float = 100.0

    EVAL: ClassVar[EvalProtocol] = EvalProtocol(epochs=1800, augment=True, batch_size=64)

    def matching_loss(self) -> torch.Tensor:
        network = self.new_network().requires_grad_(False)
        layout = self.layout(network)
        # Published per-block activations (ConvNet: each block's ReLU) or else the stage outputs.
        attention_taps = layout.extra.get("act", layout.stages)[:-1]
        taps = [*attention_taps, layout.penultimate]
        real, _ = self.real.per_class(self.batch_real)
        syn, _ = self.synthetic_batch()
        real, syn = self.siamese(real, syn)

        def summarise(features: list[torch.Tensor]) -> list[torch.Tensor]:
            return [*(spatial_attention(f, self.attention_power) for f in features[:-1]), features[-1]]

        real_summary = self.real_features(network, real, taps, summarise)
        syn_summary = summarise(self.features(network, syn, taps))
        return datadam_loss(real_summary[:-1], syn_summary[:-1], real_summary[-1], syn_summary[-1],
                            self.num_classes, self.task_balance, self.loss_scale)


__all__ = ["DataDAM", "datadam_loss", "spatial_attention"]
