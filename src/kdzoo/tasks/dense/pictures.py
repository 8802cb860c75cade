"""Predictions drawn beside the ground truth: masks painted over the image for segmentation, labelled boxes for
detection.  `plot_predictions` puts any models side by side (a run's teacher and student, or the student alone
and every distilled one in ``benchmarks/dense_methods.py``); `PredictionPictures` draws a run's at its end."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...distiller import logits_of
from ...engine.trainer import Callback
from ...plots import plot_boxes, plot_masks
from ..classification import evaluation_model

PREDICTIONS = "predictions.png"
PICTURE_IMAGES = 6  # validation images drawn in predictions.png


def _evaluated(model: nn.Module, images: torch.Tensor):
    was_training = model.training
    model.eval()
    batch = images.to(next(model.parameters()).device)
    with torch.no_grad():
        output = model(batch)
    model.train(was_training)
    return output, batch


def predict_masks(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) class indices `model` predicts for `images` (eval mode, on the model's device), on the CPU."""
    output, batch = _evaluated(model, images)
    return logits_of(output, batch).argmax(1).cpu()


def predict_boxes(model: nn.Module, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each image's detections (boxes, labels, scores) by `model` in eval mode, on the CPU."""
    detections, _ = _evaluated(model, images)
    return [{key: value.cpu() for key, value in d.items()} for d in detections]


def plot_predictions(models: dict[str, nn.Module], data, path: str | Path, title: str = "",
                     count: int = PICTURE_IMAGES) -> None:
    """The first `count` test images of `data` (a segmentation or detection `DataSplits`) with the ground truth
    and each model's predictions (column name -> model) side by side, as a PNG at `path`."""
    picks = range(min(count, len(data.test)))
    images = torch.stack([data.test[i][0] for i in picks])
    names = list(data.class_names or [str(c) for c in range(data.num_classes)])
    if data.task == "detection":
        columns = {"ground truth": [data.test[i][1] for i in picks]}
        columns.update({name: predict_boxes(model, images) for name, model in models.items()})
        plot_boxes(images.numpy(), columns, path, names, title=title)
    else:
        columns = {"ground truth": torch.stack([data.test[i][1] for i in picks]).numpy()}
        columns.update({name: predict_masks(model, images).numpy() for name, model in models.items()})
        plot_masks(images.numpy(), columns, path, names, title=title)


class PredictionPictures(Callback):
    """predictions.png at the end of a run: a few validation images with the ground truth, the teacher's and the
    student's predictions (for peers: the first student's)."""

    def __init__(self, distiller, count: int = PICTURE_IMAGES):
        self.distiller, self.count = distiller, count

    def on_train_end(self, trainer, run):
        if not run.history:
            return
        teacher = getattr(self.distiller, "teacher", None)
        models = {"teacher": teacher} if teacher is not None else {}
        models["student" if models else "prediction"] = evaluation_model(self.distiller)  # a plain run: one model
        plot_predictions(models, trainer.task.data, run.run_dir / PREDICTIONS,
                         title=f"{run.run_dir.name}: validation predictions", count=self.count)


__all__ = ["PREDICTIONS", "PredictionPictures", "plot_predictions", "predict_boxes", "predict_masks"]
