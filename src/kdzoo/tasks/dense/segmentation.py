"""Semantic segmentation on the engine's Trainer: the classification task with a mask per image.

What changes from classification is small and lives here: a batch's labels are masks (B, H, W), so its losses
are means over pixels and training accuracy is pixel accuracy; evaluation is mIoU, pixel accuracy and each
class's IoU over the whole test split; the run draws its predictions beside the ground truth.  The Distiller needs
nothing new: the student's logits are maps (torchvision's ``{"out": ...}`` and SegFormer's 1/4-size logits are
read and resized by `kdzoo.distiller.logits_of`), its cross-entropy is per pixel, classification methods see each
pixel as a sample, and methods that read maps (CWD, ...) get them whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...distiller import logits_of
from ...engine.step import MeterReading, StepBatch
from ...engine.trainer import Callback, Run, Trainer
from ...registry import register_task
from ..classification import ClassificationTask, default_callbacks, evaluation_model
from .metrics import require_dense_extra, segmentation_scores
from .pictures import PredictionPictures


def miou_score(model: nn.Module, test_data) -> tuple[str, float]:
    """A segmenter's score for the plan: its test mIoU."""
    num_classes, names = _classes_of(test_data, model)
    return "test mIoU", segmentation_scores(model, test_data, num_classes, class_names=names)["miou"]


def _classes_of(test_data, model: nn.Module) -> tuple[int, Optional[list[str]]]:
    names = getattr(test_data, "class_names", None)
    if names:
        return len(names), list(names)
    example = test_data[0][0][None].to(next(model.parameters()).device)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        count = logits_of(model(example), example).shape[1]
        model.train(was_training)
    return count, None


@register_task("segmentation", family="dense", description="semantic segmenters (masks): per-pixel cross-entropy, "
               "mIoU and per-class IoU, predictions.png; torchvision fcn/deeplabv3/lraspp, seg:tiny, SegFormer")
class SegmentationTask(ClassificationTask):
    """Distillers of segmenters trained on the same batches of (image, mask); see the module's docstring."""

    metric = "test_miou"
    score = ("miou", "mIoU")
    score_model = staticmethod(miou_score)

    @staticmethod
    def test_scores(model: nn.Module, data) -> dict[str, float]:
        names = list(data.class_names) if data.class_names else None
        return segmentation_scores(model, data.test, data.num_classes, class_names=names)

    @staticmethod
    def scores_line(scores: dict[str, float]) -> str:
        return f"mIoU {scores['miou']:.2f}%  pixel acc {scores['pixel_acc']:.2f}%  loss {scores['loss']:.4f}"

    def setup(self, trainer: Trainer) -> None:
        require_dense_extra("the segmentation task")
        super().setup(trainer)
        self.world_size = trainer.group.world_size  # each process counts its own images

    def micro_batch(self, inputs: tuple) -> StepBatch:
        labels = inputs[1]  # (B, H, W): the losses are means over pixels, as the meters weigh them
        return StepBatch(inputs, labels.numel(), labels, units=len(labels))

    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        cfg = self.cfg
        scores = segmentation_scores(evaluation_model(self.distillers[index]), self.data.test, self.data.num_classes,
                                     batch_size=max(cfg.batch_size, 64), device=trainer.device, amp=cfg.amp,
                                     class_names=list(self.data.class_names) if self.data.class_names else None)
        return {f"test_{key}": value for key, value in scores.items()}

    def train_metrics(self, reading: MeterReading, seconds: float, units: int) -> dict[str, float]:
        return {"train_pixel_acc": reading.top1, "images_per_s": units * self.world_size / seconds}

    def describe(self, row: dict, run: Run) -> str:
        test = f"test mIoU {row['test_miou']:.2f}% (best {run.best:.2f}%)  " if "test_miou" in row else ""
        return f"train pixel acc {row['train_pixel_acc']:.2f}%  {test}{row['images_per_s']:.0f} img/s"

    def default_callbacks(self, distiller, run_dir: Optional[Path], meta: dict, verbose: bool) -> list[Callback]:
        callbacks = default_callbacks(distiller, run_dir, meta, verbose)
        return callbacks + [PredictionPictures(distiller)] if run_dir is not None else callbacks


__all__ = ["SegmentationTask", "miou_score"]
