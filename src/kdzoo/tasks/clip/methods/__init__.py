"""CLIP distillation methods, one file each, registered with `register_clip_method` (importing this package
registers them all)."""
from .contrastive import Contrastive
from .feature import ClipFeatureDistillation

__all__ = ["Contrastive", "ClipFeatureDistillation"]
