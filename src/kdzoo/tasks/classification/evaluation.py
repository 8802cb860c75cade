"""Top-1 / top-5 of a classifier on a split, and which model a run's evaluation scores."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...data import Placement, make_loader
from ...engine.step import autocast_for


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 256, device: Optional[torch.device] = None,
             amp: str = "auto", num_workers: int = 0, channels_last: bool = False) -> dict[str, float]:
    """Top-1, top-5 (%) and mean cross-entropy of `model` on `dataset` (one read-back at the end)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    for images, labels, _ in make_loader(dataset, batch_size, shuffle=False, placement=Placement(device, num_workers)):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # each batch its own generation if `model` is graph-compiled
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(1).sum()
        count += len(labels)
    model.train(was_training)
    correct1, correct5, loss_sum = torch.stack([correct1, correct5, loss_sum]).tolist()
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss_sum / count}


def evaluation_model(distiller) -> nn.Module:
    """What evaluation scores for a run: the distiller's `evaluation_model()` (a method's extra heads combined
    with the student), else the student."""
    chooser = getattr(distiller, "evaluation_model", None)
    if chooser is None:
        return distiller.student
    with torch.no_grad():
        return chooser()


__all__ = ["evaluate", "evaluation_model"]
