"""DML: Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018.

K students train together from scratch, no pretrained teacher: student k minimises its cross-entropy plus
1/(K-1) * sum over the other students l of KL(p_l || p_k), p = softmax of the logits, the peers' predictions
held constant (their own losses train them).  As the authors' TensorFlow code (YingZhangDUT/Deep-Mutual-Learning,
``kl_loss_compute``: KL(peer || self), mean over the batch) and the PyTorch re-implementation
chxy95/Deep-Mutual-Learning (``trainer.py``: ``KLDivLoss(batchmean)(log_softmax(own), softmax(peer))``, summed over
the peers and divided by K-1, cross-entropy weight 1, no temperature).

``select: reliable`` is our classification reading of the pixel-wise "bidirectional selective distillation" of
Zhu et al., "A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative Learning", ICCV 2023:
knowledge flows from peer l to student k only on the samples where l is the more reliable of the two (its
cross-entropy against the label is lower), so each pair exchanges knowledge in one direction per sample.  We could
read only the paper's abstract and found no code, so this is our reading, not a verified reproduction; the
paper's region-wise BSD and heterogeneous feature distillation (segmentation feature maps) are not implemented.
The students are run by ``kdzoo.tasks.classification.PeerDistiller`` (``peers:`` in a run config).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method


def dml_loss(student_logits: torch.Tensor, peer_logits: Sequence[torch.Tensor], temperature: float = 1.0,
             labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1/(K-1) * sum_l KL(p_l || p_k), each KL summed over classes and averaged over the batch (T^2-scaled when a
    temperature softens both sides).  With `labels`, peer l's term counts only on the samples where its
    cross-entropy is below the student's (the selective, reliable direction); the mean stays over the whole batch.
    No gradient reaches the peers."""
    if not peer_logits:
        raise ConfigError("dml: no peer outputs; train it with a 'peers:' section (two or more students)")
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    own_ce = F.cross_entropy(student_logits, labels, reduction="none").detach() if labels is not None else None
    total = student_logits.new_zeros(())
    for peer in peer_logits:
        peer = peer.detach()
        log_q = F.log_softmax(peer / temperature, dim=1)
        per_sample = (log_q.exp() * (log_q - log_p)).sum(1)
        if labels is not None:
            per_sample = per_sample * (F.cross_entropy(peer, labels, reduction="none") < own_ce).to(per_sample.dtype)
        total = total + per_sample.mean()
    return total / len(peer_logits) * temperature**2


@register_method("dml", family="scheme", cross_arch=True,
                 description="students teach each other (mutual learning)",
                 layers="logits only", paper="Zhang et al. 2018, Deep Mutual Learning")
class DML(Method):
    """Defaults as DML's code: cross-entropy weight 1, KL weight 1, temperature 1, every sample exchanged.

    Options:
        weight: multiplier of the KL term toward the other students
        temperature: softmax temperature of the KL term
        select: all: learn from every peer on every sample; reliable: from a peer only on the samples where
            its cross-entropy is below the student's
    """

    ce_weight = 1.0
    needs_teacher = False
    needs_peers = True

    def __init__(self, weight: NonNegative = 1.0, temperature: Positive = 1.0,
                 select: Literal["all", "reliable"] = "all"):
        super().__init__()
        self.weight, self.temperature, self.select = weight, temperature, select
        self.reads_labels = select == "reliable"  # which peer is right needs the label

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        labels = ctx.labels if self.select == "reliable" else None
        return {"dml": self.weight * dml_loss(ctx.student_logits, ctx.peer_logits, self.temperature, labels)}
