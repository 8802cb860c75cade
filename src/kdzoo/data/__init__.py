"""Datasets by name (``build_dataset("digits")``) and the loaders the trainer uses."""
from . import dense_folders  # noqa: F401  (registers the dense datasets)
from .arrays import AugmentSpec, UInt8Images
from .cache import DecodedSplit, cached_decode
from .datasets import DataSplits, build_dataset, input_example, labels_of
from .loaders import Placement, TensorData, make_loader
from .scenes import DetectionData
from .semi import UNLABELLED, keep_labels_of, labelled_count, withhold_labels

__all__ = ["DataSplits", "build_dataset", "input_example", "labels_of", "TensorData", "make_loader", "Placement",
           "UInt8Images", "AugmentSpec", "DecodedSplit", "cached_decode", "withhold_labels", "keep_labels_of",
           "labelled_count", "UNLABELLED", "DetectionData"]
