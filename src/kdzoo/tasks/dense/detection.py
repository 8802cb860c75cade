"""Object detection on the engine's Trainer: torchvision's detectors (FCOS, RetinaNet, SSD, Faster R-CNN and the
small ``det:`` ones) trained on their targets, distilled through the same Distiller.

A batch's labels are its targets (per image a dict of boxes and labels); the student computes its own losses on
them (they replace the cross-entropy), the methods read FPN features by module path and, for single-stage
detectors, the dense head's class logits and box regression (``head[cls_logits]``, tapped; see
`kdzoo.taps.detector_layout`).  Evaluation is COCO mAP over the whole test split (torchmetrics with pycocotools);
the run draws its boxes beside the ground truth.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...engine.step import MeterReading, StepBatch
from ...engine.trainer import Callback, Run, Trainer
from ...registry import register_task
from ..classification import ClassificationTask, default_callbacks, evaluation_model
from .metrics import detection_scores, require_dense_extra, targets_to
from .pictures import PredictionPictures


def map_score(model: nn.Module, test_data) -> tuple[str, float]:
    """A detector's score for the plan: its test box mAP (IoU 0.50:0.95)."""
    return "test mAP", detection_scores(model, test_data)["map"]


@register_task("detection", family="dense", description="object detectors (boxes): the detector's own losses, COCO "
               "mAP/AP50/AP75 (pycocotools), predictions.png; torchvision fcos/retinanet/ssdlite/fasterrcnn, det:*")
class DetectionTask(ClassificationTask):
    """Distillers of detectors trained on the same batches of (image, target); see the module's docstring."""

    metric = "test_map"
    score = ("map", "mAP")
    score_model = staticmethod(map_score)

    @staticmethod
    def test_scores(model: nn.Module, data) -> dict[str, float]:
        return detection_scores(model, data.test, class_names=list(data.class_names) if data.class_names else None)

    @staticmethod
    def scores_line(scores: dict[str, float]) -> str:
        return f"mAP {scores['map']:.2f}%  AP50 {scores['map_50']:.2f}%  AP75 {scores['map_75']:.2f}%"

    def setup(self, trainer: Trainer) -> None:
        require_dense_extra("the detection task", coco=True)
        super().setup(trainer)
        self.world_size = trainer.group.world_size

    def to_device(self, trainer: Trainer, batch) -> tuple[torch.Tensor, list, torch.Tensor]:
        images, targets, index = batch
        return (images.to(trainer.device, non_blocking=True), targets_to(targets, trainer.device),
                index.to(trainer.device, non_blocking=True))

    def micro_batch(self, inputs: tuple) -> StepBatch:
        images = inputs[0]  # no training accuracy: a detector's predictions are boxes
        return StepBatch(inputs, len(images), None, units=len(images))

    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        names = list(self.data.class_names) if self.data.class_names else None
        scores = detection_scores(evaluation_model(self.distillers[index]), self.data.test,
                                  batch_size=max(self.cfg.batch_size, 32), device=trainer.device, class_names=names)
        return {f"test_{key}": value for key, value in scores.items()}

    def train_metrics(self, reading: MeterReading, seconds: float, units: int) -> dict[str, float]:
        return {"images_per_s": units * self.world_size / seconds}

    def describe(self, row: dict, run: Run) -> str:
        test = (f"test mAP {row['test_map']:.2f}% AP50 {row['test_map_50']:.2f}% (best {run.best:.2f}%)  "
                if "test_map" in row else "")
        return f"{test}{row['images_per_s']:.0f} img/s"

    def default_callbacks(self, distiller, run_dir: Optional[Path], meta: dict, verbose: bool) -> list[Callback]:
        callbacks = default_callbacks(distiller, run_dir, meta, verbose)
        return callbacks + [PredictionPictures(distiller)] if run_dir is not None else callbacks


__all__ = ["DetectionTask", "map_score"]
