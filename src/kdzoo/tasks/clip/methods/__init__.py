"""CLIP distillation methods, one file each, registered with `register_clip_method` (importing this package
registers them all)."""
from .contrastive import Contrastive
from .feature import ClipFeatureDistillation

__all__ = ["Contrastive", "ClipFeatureDistillation"]
from .tinyclip import TinyClip  # noqa: E402,F401
from .clip_kd import ClipCRD, ClipGD, ClipICL, ClipKD  # noqa: E402,F401
from .clip_refine import ClipRefine  # noqa: E402,F401
from .dc_clip import DCClip  # noqa: E402,F401
from .zscl import ZSCL, PromptFineTuning  # noqa: E402,F401
from .froster import Froster  # noqa: E402,F401
from .masked_feature import ClipMaskedFeatureDistillation  # noqa: E402,F401
from .augmented_feature import ClipAugmentedFeatureDistillation  # noqa: E402,F401
