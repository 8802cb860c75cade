"""Dense-prediction scores: mIoU and per-class IoU of a segmenter (torchmetrics' confusion matrix), over a whole
split.  torchmetrics comes with the ``[dense]`` extra."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...data import Placement, make_loader
from ...data.semi import UNLABELLED
from ...distiller import logits_of
from ...engine.runtime import lazy_import
from ...engine.step import autocast_for
from ...errors import ConfigError

torchmetrics_classification = lazy_import("torchmetrics.classification")
torchmetrics_detection = lazy_import("torchmetrics.detection")


def require_dense_extra(what: str, coco: bool = False) -> None:
    """A one-line error naming the extra when torchmetrics (or, with `coco`, pycocotools) is missing."""
    try:
        import torchmetrics  # noqa: F401
        if coco:
            import pycocotools  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs the optional extra: pip install 'kdzoo[dense]'") from None


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(per-class IoU, mIoU, pixel accuracy) from a (C, C) confusion matrix (rows: truth, columns: prediction).

    IoU_c = TP / (TP + FP + FN); a class absent from both the truth and the predictions has no IoU (nan) and is
    left out of the mean, as mmsegmentation and torchmetrics' macro Jaccard index do."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))
    pixel_accuracy = float(hits.sum() / confusion.sum().clamp(min=1))
    return iou, float(iou.nanmean()), pixel_accuracy


@torch.no_grad()
def segmentation_scores(model: nn.Module, dataset, num_classes: int, batch_size: int = 64,
                        device: Optional[torch.device] = None, amp: str = "auto",
                        class_names: Optional[list[str]] = None) -> dict[str, float]:
    """mIoU, pixel accuracy (%), mean per-pixel cross-entropy and each class's IoU (%, ``iou_<name>``) of `model`
    on every image of `dataset` (items: image, mask (H, W) with -1 for unlabelled pixels, index)."""
    require_dense_extra("segmentation metrics (mIoU)")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    matrix = torchmetrics_classification.MulticlassConfusionMatrix(num_classes, ignore_index=UNLABELLED,
                                                                    validate_args=False).to(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    pixels = torch.zeros((), device=device, dtype=torch.float64)
    for images, masks, _ in make_loader(dataset, batch_size, shuffle=False, placement=Placement(device)):
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with autocast_for(device, amp):
            logits = logits_of(model(images), images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, masks, ignore_index=UNLABELLED, reduction="sum")
        pixels += (masks != UNLABELLED).sum()
        matrix.update(logits.argmax(1), masks)
    model.train(was_training)
    iou, miou, pixel_accuracy = iou_from_confusion(matrix.compute().cpu())
    names = class_names or [str(c) for c in range(num_classes)]
    scores = {"miou": 100 * miou, "pixel_acc": 100 * pixel_accuracy, "loss": float(loss_sum / pixels.clamp(min=1))}
    scores.update({f"iou_{name}": 100 * float(value) for name, value in zip(names, iou)})
    return scores


def targets_to(targets: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets]


@torch.no_grad()
def detection_scores(model: nn.Module, dataset, batch_size: int = 32, device: Optional[torch.device] = None,
                     class_names: Optional[list[str]] = None) -> dict[str, float]:
    """COCO box mAP (%) of a torchvision detector on every image of `dataset` (items: image, target, index):
    ``map`` (IoU 0.50:0.95), ``map_50``, ``map_75``, ``map_small/medium/large``, ``mar_100`` and each class's AP
    (``ap_<name>``), by torchmetrics' MeanAveragePrecision with the pycocotools backend (COCO's own evaluation);
    classes absent from the split have no AP (left out)."""
    require_dense_extra("detection metrics (mAP)", coco=True)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    metric = torchmetrics_detection.MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True,
                                                         backend="pycocotools")
    for images, targets, _ in make_loader(dataset, batch_size, shuffle=False, placement=Placement(device)):
        detections = model(images.to(device, non_blocking=True))
        metric.update([{k: v.cpu() for k, v in d.items()} for d in detections], targets_to(targets, "cpu"))
    model.train(was_training)
    result = metric.compute()
    # COCO's -1 means "no object of that size/class in the split": left out rather than averaged in
    scores = {key: 100 * float(result[key]) for key in ("map", "map_50", "map_75", "map_small", "map_medium",
                                                         "map_large", "mar_100") if float(result[key]) >= 0}
    classes = result.get("classes")
    per_class = result.get("map_per_class")
    if classes is not None and per_class is not None and per_class.numel() > 1:
        for label, value in zip(classes.view(-1).tolist(), per_class.view(-1).tolist()):
            name = class_names[label] if class_names and label < len(class_names) else str(label)
            if value >= 0:  # -1: no ground truth of that class
                scores[f"ap_{name}"] = 100 * value
    return scores


__all__ = ["segmentation_scores", "detection_scores", "iou_from_confusion", "require_dense_extra", "targets_to"]
