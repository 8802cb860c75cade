"""Dense prediction on the engine's Trainer: semantic segmentation (masks, mIoU) and object detection (boxes, COCO
mAP) as tasks beside classification, which they extend (`SegmentationTask`, `DetectionTask`)."""
from .detection import DetectionTask, map_score
from .metrics import detection_scores, iou_from_confusion, require_dense_extra, segmentation_scores
from .pictures import PREDICTIONS, PredictionPictures, plot_predictions, predict_boxes, predict_masks
from .segmentation import SegmentationTask, miou_score

__all__ = ["SegmentationTask", "DetectionTask", "PredictionPictures", "plot_predictions", "predict_masks",
           "predict_boxes", "miou_score", "map_score", "segmentation_scores", "detection_scores",
           "iou_from_confusion", "require_dense_extra", "PREDICTIONS"]
